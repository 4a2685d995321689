//! `GET /v1/events`: the event feed as server-sent events. Each event's `id` is its
//! sequence number, so a client that reconnects with `Last-Event-ID` gets only what
//! it missed (of what the feed still keeps). A stream is bounded in number and in
//! lifetime, ends at shutdown, and is kept open through proxies by a comment every
//! 15 s.

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
    let after = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<u64>))
    {
        None => None,
        Some(Ok(Ok(seq))) => Some(seq),
        Some(_) => {
            return ApiError::bad_request(
                "Last-Event-ID: expected the sequence number of an event",
            )
            .into_response();
        }
    };
    let (past, live) = s.events.subscribe(after);
    let feed = Feed {
        past: past.into(),
        live,
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
    past: VecDeque<EventView>,
    live: tokio::sync::broadcast::Receiver<EventView>,
    stop: tokio_util::sync::CancellationToken,
    until: Instant,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Feed)> {
        if let Some(e) = self.past.pop_front() {
            return Some((Ok(sse(&e)), self));
        }
        let event = tokio::select! {
            _ = self.stop.cancelled() => return None,
            _ = tokio::time::sleep_until(self.until) => return None,
            r = self.live.recv() => match r {
                Ok(e) => sse(&e),
                // Too slow a reader: say how many it missed, and go on from now.
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            },
        };
        Some((Ok(event), self))
    }
}

fn sse(e: &EventView) -> Event {
    let data = serde_json::to_string(e).unwrap_or_default();
    Event::default().id(e.seq.to_string()).data(data)
}
