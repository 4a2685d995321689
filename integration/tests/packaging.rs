//! The .deb (built by `scripts/package.sh --dev`, which scripts/test-all.sh runs before
//! the tests): what it holds, that its binary runs, that its sample config passes
//! `--check-config`, and that its man page and completions are real.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration::*;

/// The .deb in target/debian/, if it was built.
fn deb() -> Option<PathBuf> {
    let target = mesh_bin().parent()?.parent()?.to_path_buf();
    std::fs::read_dir(target.join("debian"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
}

fn skip_without_deb(test: &str) -> Option<PathBuf> {
    let found = deb();
    if found.is_none() {
        integration::skip::skip(
            test,
            "MESH_REQUIRE_PACKAGE",
            "no .deb in target/debian: run scripts/package.sh --dev (scripts/test-all.sh does)",
        );
    }
    found
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_deb_holds_the_binary_unit_config_man_page_and_completions() {
    let test = "the_deb_holds_the_binary_unit_config_man_page_and_completions";
    let Some(deb) = skip_without_deb(test) else {
        return;
    };
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/mesh",
        "./lib/systemd/system/mesh.service",
        "./etc/mesh/mesh.toml",
        "./usr/share/man/man1/mesh.1.gz",
        "./usr/share/bash-completion/completions/mesh",
        "./usr/share/zsh/vendor-completions/_mesh",
        "./usr/share/fish/vendor_completions.d/mesh.fish",
        "./usr/share/doc/mesh/examples/mesh-ebpf.conf",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} in:\n{listing}"
        );
    }
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(
        info.contains("Package: mesh") && info.contains("conffiles"),
        "{info}"
    );

    // Unpacked into a directory of its own: the binary runs, and the man page and the
    // completions are what they claim to be.
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path()));
    let mesh = root.path().join("usr/bin/mesh");
    assert!(run(Command::new(&mesh).arg("--version")).starts_with("mesh "));
    let man = run(Command::new("sh").arg("-c").arg(format!(
        "zcat {}",
        root.path().join("usr/share/man/man1/mesh.1.gz").display()
    )));
    assert!(
        man.contains(".TH mesh 1") && man.contains("service"),
        "{man}"
    );
    let bash = std::fs::read_to_string(
        root.path()
            .join("usr/share/bash-completion/completions/mesh"),
    )
    .unwrap();
    assert!(
        bash.contains("_mesh()") && bash.contains("completions"),
        "bash completions"
    );

    // The unit runs the config check first, and is hardened.
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/mesh.service")).unwrap();
    for line in [
        "ExecStartPre=/usr/bin/mesh agent --config /etc/mesh/mesh.toml --check-config",
        "ExecStart=/usr/bin/mesh agent --config /etc/mesh/mesh.toml",
        "StateDirectory=mesh",
        "RuntimeDirectory=mesh",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in the unit");
    }
    check_sample(&mesh, &root.path().join("etc/mesh/mesh.toml"));
}

/// The sample config passes `--check-config`, with its key file made.
fn check_sample(mesh: &Path, sample: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, keygen()).unwrap();
    let text = std::fs::read_to_string(sample)
        .unwrap()
        .replace("/etc/mesh/cluster.key", key.to_str().unwrap());
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, text).unwrap();
    let out = run(Command::new(mesh)
        .args(["agent", "--check-config", "--config"])
        .arg(&config));
    assert!(out.contains(": ok"), "{out}");
}

#[test]
fn the_sample_config_in_deploy_passes_check_config() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh.toml");
    check_sample(&mesh_bin(), &sample);
}
