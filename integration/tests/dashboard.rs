//! The dashboard at `/ui` and its event feed at `/v1/events`. The feed is read with a
//! plain socket; the dashboard is driven in Debian's chromium, headless, through
//! chromedriver (WebDriver), against three hosts in network namespaces.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use integration::cluster::Cluster;
use integration::*;

const TOKEN: &str = "dashboard-test-token-0123456789";

/// Opens `GET /v1/events` with `headers` and returns the reader, past the response head.
fn open_feed(port: u16, headers: &str) -> (u16, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /v1/events HTTP/1.1\r\nHost: mesh\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    (code, reader)
}

/// Reads events from a feed until one satisfies `until`; returns all read, each with
/// its SSE id as `_id`. An event is a block of `id:` and `data:` lines ended by a blank
/// line; chunk-size lines of the HTTP framing and keep-alive comments are skipped.
fn read_events(reader: &mut BufReader<TcpStream>, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    let (mut id, mut data) = (String::new(), None::<String>);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("reading the feed: {e}; so far {seen:?}"),
        }
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v.to_string());
        } else if line.is_empty()
            && let Some(text) = data.take()
        {
            let mut event: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            event["_id"] = Value::String(std::mem::take(&mut id));
            let done = until(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
    panic!("the feed ended or stalled before the event looked for; got {seen:?}");
}

#[test]
fn the_event_feed_streams_changes_needs_the_token_and_resumes_after_last_event_id() {
    let api_port = free_port();
    let config = format!("[api]\ntcp = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n");
    let agent = Agent::start(Some(&config), &[]);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");

    let (status, _) = open_feed(api_port, "");
    assert_eq!(
        status, 401,
        "the feed needs the token like the rest of the API"
    );
    for junk in ["soon", "7", "1.x"] {
        let (status, _) = open_feed(api_port, &format!("{auth}Last-Event-ID: {junk}\r\n"));
        assert_eq!(
            status, 400,
            "Last-Event-ID {junk:?} is not an id the feed sent"
        );
    }
    // The page's assets hold no data and load without the token; the page asks for it.
    let mut s = TcpStream::connect(("127.0.0.1", api_port)).unwrap();
    let (status, page) = http_exchange(&mut s, "GET", "/ui", None, None).unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("/ui/app.js"), "{page}");

    let (status, mut feed) = open_feed(api_port, &auth);
    assert_eq!(status, 200);
    let backend = Backend::start("web.1");
    let published = free_port().to_string();
    assert_ok(agent.cli(&[
        "service",
        "create",
        "web",
        "-p",
        &format!("{published}:80"),
        "--health-interval",
        "200ms",
    ]));
    assert_ok(agent.cli(&[
        "task",
        "add",
        "web",
        &format!("127.0.0.1:{}", backend.port),
        "--id",
        "web.1",
    ]));
    let seen = read_events(&mut feed, |e| {
        e["task"] == "web.1" && e["text"].as_str().unwrap_or("").contains("is healthy")
    });
    let texts: Vec<&str> = seen.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.contains(&"service web created"), "{texts:?}");
    assert!(texts.contains(&"task web.1 added on it"), "{texts:?}");
    let healthy = seen.last().unwrap();
    assert_eq!(healthy["kind"], "task");
    assert_eq!(healthy["level"], "info");
    assert_eq!(healthy["service"], "web");
    assert_eq!(healthy["host"], "it");
    let seq = healthy["seq"].as_u64().expect("seq");
    let id = healthy["_id"].as_str().unwrap().to_string();
    assert!(
        id.ends_with(&format!(".{seq}")),
        "the SSE id is RUN.SEQ: {id}"
    );

    // A task that stops answering is a warning on the feed.
    backend.kill();
    let seen = read_events(&mut feed, |e| {
        e["task"] == "web.1" && e["text"].as_str().unwrap_or("").contains("unhealthy")
    });
    assert_eq!(seen.last().unwrap()["level"], "warn", "{seen:?}");
    drop(feed);

    // A client that reconnects with the last id it saw gets what it missed, no more.
    let (_, mut resumed) = open_feed(api_port, &format!("{auth}Last-Event-ID: {id}\r\n"));
    let replay = read_events(&mut resumed, |e| {
        e["text"].as_str().unwrap_or("").contains("unhealthy")
    });
    assert!(
        replay.iter().all(|e| e["seq"].as_u64().unwrap() > seq),
        "only events after {seq}: {replay:?}"
    );
    assert_eq!(replay[0]["seq"].as_u64(), Some(seq + 1), "none missed");

    // An id from an earlier run of the agent (its numbers started again): all that
    // is kept, from the first.
    let (_, mut other) = open_feed(api_port, &format!("{auth}Last-Event-ID: 1.{seq}\r\n"));
    let all = read_events(&mut other, |_| true);
    assert_eq!(all[0]["seq"].as_u64(), Some(1), "{all:?}");

    // The tasks of every service in one answer, as the dashboard reads them.
    let (status, tasks) = agent.http("GET", "/v1/tasks", None);
    assert_eq!(status, 200);
    assert_eq!(tasks[0]["id"], "web.1", "{tasks}");
    assert_eq!(tasks[0]["health"], "unhealthy", "{tasks}");
}

/// Whether chromium and chromedriver are here; prints why a test skips. With
/// `MESH_REQUIRE_BROWSER=1` (CI as root) a skip is a failure.
fn skip_unless_browser(test: &str) -> bool {
    let missing: Vec<&str> = ["chromium", "chromedriver"]
        .into_iter()
        .filter(|tool| {
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    let why = if !is_root() {
        "needs root (network namespaces for the three hosts); run the tests as root, as CI does"
            .to_string()
    } else if !missing.is_empty() {
        format!(
            "{} not installed: apt-get install chromium chromium-driver (scripts/test-all.sh does)",
            missing.join(" and ")
        )
    } else {
        return false;
    };
    integration::skip::skip(test, "MESH_REQUIRE_BROWSER", &why)
}

/// Moves the calling thread into `ns`'s network namespace: the WebDriver client then
/// reaches chromedriver, which listens on that namespace's loopback.
fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the netns");
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The text of the first element matching `css`, polled until `want` holds.
async fn wait_text(client: &Client, css: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = client.find(Locator::Css(css)).await
            && let Ok(text) = e.text().await
        {
            if want(&text) {
                return text;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = client.source().await.unwrap_or_default();
    panic!("timed out waiting for {what} ({css}); last text {last:?}; page:\n{page}");
}

/// chromedriver and the chromium it starts. Dropping it kills both, found by their
/// profile directory, even when the test failed before the browser was closed; a
/// start kills what an earlier, crashed run left.
struct Browser {
    // Dropped first: the processes go before their profile directory.
    _driver: ChildGuard,
    profile: tempfile::TempDir,
}

/// A profile directory is `mesh-it-browser-<pid of the test process>-<random>`.
const PROFILE_PREFIX: &str = "mesh-it-browser-";

/// Kills browsers whose test process is gone: a run that crashed before its drop.
fn kill_stale_browsers() {
    let out = std::process::Command::new("pgrep")
        .args(["-a", "-f", PROFILE_PREFIX])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    for line in out.lines() {
        let Some((pid, cmd)) = line.split_once(' ') else {
            continue;
        };
        let owner = cmd
            .split(PROFILE_PREFIX)
            .nth(1)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let alive = owner.is_some_and(|o| std::path::Path::new(&format!("/proc/{o}")).exists());
        if !alive {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
}

impl Browser {
    fn start(ns: &integration::Netns, port: u16) -> Browser {
        kill_stale_browsers();
        let profile = tempfile::Builder::new()
            .prefix(&format!("{PROFILE_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let driver = ns
            .command("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}/chromedriver.log",
                profile.path().display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Browser {
            _driver: ChildGuard(driver),
            profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let profile = self.profile.path().display().to_string();
        let _ = std::process::Command::new("pkill")
            .args(["-9", "-f", &profile])
            .status();
        // Killed processes take a moment to go; the directory is removed after them.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && std::process::Command::new("pgrep")
                .args(["-f", &profile])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

async fn click(client: &Client, css: &str) {
    client
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

#[test]
fn the_dashboard_in_a_browser_shows_a_killed_task_unhealthy_and_drains_one() {
    let test = "the_dashboard_in_a_browser_shows_a_killed_task_unhealthy_and_drains_one";
    if skip_unless_browser(test) {
        return;
    }
    let key = keygen();
    let c = Cluster::new(3);
    let hosts: Vec<Agent> = (0..3)
        .map(|i| {
            let mut config = c.cluster_config(i, &key);
            if i == 0 {
                config += &format!(
                    "[api]\ntcp = \"{}:9000\"\ntoken = \"{TOKEN}\"\n",
                    c.hosts[0].ip
                );
            }
            Agent::start_named_in(
                &c.hosts[i].ns,
                &format!("host{}", i + 1),
                Some(&config),
                &[],
            )
        })
        .collect();
    eventually("three hosts alive on host1", || {
        let (_, nodes) = hosts[0].http("GET", "/v1/nodes", None);
        let alive = nodes.as_array().into_iter().flatten();
        (alive.filter(|n| n["status"] == "alive").count() == 3).then_some(())
    });
    assert_ok(hosts[0].cli(&[
        "service",
        "create",
        "web",
        "-p",
        "8080:80",
        "--health-interval",
        "200ms",
    ]));
    eventually("web known on every host", || {
        hosts
            .iter()
            .all(|h| h.http("GET", "/v1/services/web", None).0 == 200)
            .then_some(())
    });
    let mut backends = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let id = format!("web.{}", i + 1);
        let b = Backend::start_in_at(&c.hosts[i].ns, &id, &c.hosts[i].ip, 0);
        let addr = format!("{}:{}", c.hosts[i].ip, b.port);
        assert_ok(host.cli(&["task", "add", "web", &addr, "--id", &id]));
        backends.push(b);
    }
    eventually("three tasks routed on host1", || {
        (hosts[0].routed("web") == ids(&["web.1", "web.2", "web.3"])).then_some(())
    });

    // chromedriver in the client's namespace, on its loopback; chromium, which it
    // starts, reaches host1's API over the cluster's bridge.
    let driver_port = 9515;
    let browser = Browser::start(&c.client.ns, driver_port);
    let screenshot: PathBuf = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let url = format!("http://{}:9000/ui", c.hosts[0].ip);
    let killed = backends.remove(1);
    let client_ns = c.client.ns.name.clone();
    let profile_dir = browser.profile.path().display().to_string();
    let shot = screenshot.clone();
    let driving = std::thread::spawn(move || {
        enter(&client_ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(drive(url, driver_port, profile_dir, killed, shot))
    });
    let outcome = driving.join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }

    // What the page did reached the agent: web.1 drains, and the others do not.
    let ps = hosts[0].cli_json(&["service", "ps", "web"]);
    let state = |id: &str| {
        ps.as_array()
            .into_iter()
            .flatten()
            .find(|t| t["id"] == id)
            .map(|t| t["state"].clone())
    };
    assert_eq!(state("web.1"), Some(json!("draining")), "{ps}");
    assert_eq!(state("web.3"), Some(json!("active")), "{ps}");
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG"),
        "a PNG at {}",
        screenshot.display()
    );
    eprintln!("the dashboard's screenshot: {}", screenshot.display());
}

async fn drive(url: String, port: u16, profile: String, killed: Backend, screenshot: PathBuf) {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1400,1000",
                format!("--user-data-dir={profile}"),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let driver = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&driver)
            .await
        {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("no WebDriver session from chromedriver at {driver}: {e}"),
        }
    };

    // Without a token the page asks for one, and a wrong one is refused on the page.
    client.goto(&url).await.unwrap();
    client
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css("#login:not([hidden])"))
        .await
        .expect("the token form");
    client
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("wrong-token")
        .await
        .unwrap();
    click(&client, "#login button[type=submit]").await;
    wait_text(&client, "#login-error", "the refusal", |t| {
        t.contains("missing or wrong bearer token")
    })
    .await;

    // With the token in the URL fragment, the page shows the cluster.
    client.goto("about:blank").await.unwrap();
    client.goto(&format!("{url}#token={TOKEN}")).await.unwrap();
    wait_text(&client, "#stream", "the live event stream", |t| t == "live").await;
    for host in ["host1", "host2", "host3"] {
        let css = format!("#nodes tr[data-node=\"{host}\"] td.status");
        wait_text(&client, &css, "a host alive", |t| t == "alive").await;
    }
    for task in ["web.1", "web.2", "web.3"] {
        let css = format!("#tasks tr[data-task=\"{task}\"] td.health");
        wait_text(&client, &css, "a healthy task", |t| t == "healthy").await;
    }
    assert!(
        client.current_url().await.unwrap().fragment().is_none(),
        "the token leaves the address bar"
    );

    // host2's task dies: the page shows it unhealthy without a reload, and the feed says so.
    killed.kill();
    wait_text(
        &client,
        "#tasks tr[data-task=\"web.2\"] td.health",
        "web.2 unhealthy",
        |t| t == "unhealthy",
    )
    .await;
    wait_text(
        &client,
        "#events li[data-task=\"web.2\"].warn",
        "the event",
        |t| t.contains("task web.2 is unhealthy"),
    )
    .await;

    // A task of another host cannot be drained from here: its host's agent owns it.
    let remote = client
        .find(Locator::Css("#tasks tr[data-task=\"web.3\"] button.drain"))
        .await
        .unwrap();
    assert_eq!(
        remote.attr("disabled").await.unwrap().as_deref(),
        Some("true")
    );

    // Drain host1's task: a confirmation first, and Cancel changes nothing.
    click(&client, "#tasks tr[data-task=\"web.1\"] button.drain").await;
    wait_text(&client, "#confirm-text", "the confirmation", |t| {
        t.contains("Drain task web.1")
    })
    .await;
    click(&client, "#confirm-no").await;
    click(&client, "#tasks tr[data-task=\"web.1\"] button.drain").await;
    click(&client, "#confirm-yes").await;
    wait_text(
        &client,
        "#tasks tr[data-task=\"web.1\"] td.state",
        "web.1 draining",
        |t| t == "draining",
    )
    .await;
    wait_text(&client, "#message", "the outcome", |t| {
        t.contains("web.1 is draining")
    })
    .await;
    wait_text(
        &client,
        "#tasks tr[data-task=\"web.1\"] button.undrain",
        "an undrain button",
        |t| t == "Undrain",
    )
    .await;

    let png = client.screenshot().await.expect("a screenshot");
    std::fs::write(&screenshot, png).expect("save the screenshot");
    client.close().await.unwrap();
}
