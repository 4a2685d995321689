//! `GET /v1/events`: the event feed as server-sent events. Each event's `id` is
//! `<run>.<seq>`, so a client that reconnects with `Last-Event-ID` gets only what it
//! missed, and is told how many of those the feed no longer keeps (`event: lagged`).
//! Streams are bounded in number and in lifetime, end at shutdown, and are kept open
//! through proxies by a comment every 15 s.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use mesh_api::EventView;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::{ApiError, AppState};
use crate::events::Resume;

/// Open event streams per agent; each holds a connection.
pub const MAX_STREAMS: usize = 32;
/// A stream ends after this; clients reconnect with `Last-Event-ID` and miss nothing
/// the feed still keeps. A long-lived stream cannot pin a slot for ever.
const LIFETIME: Duration = Duration::from_secs(3600);

pub async fn stream(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let Ok(slot) = s.event_streams.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{MAX_STREAMS} event streams are open on this agent; close one or retry later"),
        )
        .into_response();
    };
    let last = headers.get("last-event-id");
    let from = match last.map(|v| v.to_str().ok().and_then(Resume::parse)) {
        None => None,
        Some(Some(from)) => Some(from),
        Some(None) => {
            return ApiError::bad_request(
                "Last-Event-ID: expected the id of an event this feed sent (RUN.SEQ)",
            )
            .into_response();
        }
    };
    let start = s.events.subscribe(from);
    let feed = Feed {
        boot: s.events.boot(),
        missed: start.missed,
        past: start.past.into(),
        live: start.live,
        stop: s.stop.clone(),
        until: Instant::now() + LIFETIME,
        _slot: slot,
    };
    let events = futures_util::stream::unfold(feed, Feed::next);
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct Feed {
    boot: u64,
    /// Told first: events after the client's last id that the feed no longer keeps.
    missed: u64,
    past: VecDeque<EventView>,
    live: tokio::sync::broadcast::Receiver<EventView>,
    stop: tokio_util::sync::CancellationToken,
    until: Instant,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Feed)> {
        if self.missed > 0 {
            let missed = std::mem::take(&mut self.missed);
            return Some((Ok(lagged(missed)), self));
        }
        if let Some(e) = self.past.pop_front() {
            return Some((Ok(sse(self.boot, &e)), self));
        }
        let event = tokio::select! {
            _ = self.stop.cancelled() => return None,
            _ = tokio::time::sleep_until(self.until) => return None,
            r = self.live.recv() => match r {
                Ok(e) => sse(self.boot, &e),
                // Too slow a reader: say how many it missed, and go on from now.
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => return None,
            },
        };
        Some((Ok(event), self))
    }
}

fn sse(boot: u64, e: &EventView) -> Event {
    let data = serde_json::to_string(e).unwrap_or_default();
    Event::default().id(Resume::id(boot, e.seq)).data(data)
}

fn lagged(missed: u64) -> Event {
    Event::default().event("lagged").data(missed.to_string())
}
