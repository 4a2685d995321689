//! `--log-format json`: one JSON object per line, with the event's fields at the top
//! level beside `timestamp`, `level` and `target`, as log pipelines expect.
//!
//! tracing-subscriber's own JSON format records every field it cannot see as a
//! primitive as a string, so a list arrives as `"seeds":"[\"10.0.0.2:7946\"]"`, which
//! a pipeline cannot index. `tracing`'s typed values (`valuable`) are still behind an
//! unstable cfg, so the type of a field is not knowable here. The rule instead: a
//! field recorded with `?` whose `Debug` text is a JSON array is written as that
//! array. A `Vec` of strings or numbers is, so an event logs a list as
//! `seeds = ?addrs_as_strings`; anything else stays a string, as before.
//!
//! The agent opens no spans, so none are written.

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = String::with_capacity(256);
        line.push('{');
        push(&mut line, "timestamp", &Value::String(timestamp));
        push(&mut line, "level", &Value::from(meta.level().as_str()));
        for (name, value) in &fields.values {
            // A field must not shadow the line's own keys, or the line would carry a
            // key twice.
            match *name {
                "timestamp" | "level" | "target" => {
                    push(&mut line, &format!("field.{name}"), value)
                }
                _ => push(&mut line, name, value),
            }
        }
        let target = fields.log_target.as_deref().unwrap_or(meta.target());
        push(&mut line, "target", &Value::from(target));
        line.pop(); // the last comma
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Appends `"name":value,`.
fn push(line: &mut String, name: &str, value: &Value) {
    line.push_str(&Value::from(name).to_string());
    line.push(':');
    line.push_str(&value.to_string());
    line.push(',');
}

/// An event's fields as JSON values, in the order the event gives them.
#[derive(Default)]
struct Fields {
    values: Vec<(&'static str, Value)>,
    /// The target of an event that came from the `log` crate, which records it as a
    /// field (`log.target`) under a `log` target of its own.
    log_target: Option<String>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        self.values.push((field.name(), value));
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() != "message"
            && text.starts_with('[')
            && let Ok(list @ Value::Array(_)) = serde_json::from_str::<Value>(&text)
        {
            return self.put(field, list);
        }
        self.put(field, Value::String(text));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => self.log_target = Some(value.to_string()),
            "log.module_path" | "log.file" => {}
            _ => self.put(field, Value::from(value)),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() != "log.line" {
            self.put(field, Value::from(value));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON a `tracing` event becomes, through the real subscriber stack.
    fn logged(emit: impl FnOnce()) -> Value {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn lists_are_arrays_and_primitives_keep_their_type() {
        let seeds = vec!["10.0.0.2:7946".to_string(), "10.0.0.3:7946".to_string()];
        let ports = vec![80u16, 443];
        let line = logged(
            || tracing::info!(seeds = ?seeds, ports = ?ports, count = 2, ok = true, node = %"h1", "started"),
        );
        assert_eq!(
            line["seeds"],
            serde_json::json!(["10.0.0.2:7946", "10.0.0.3:7946"])
        );
        assert_eq!(line["ports"], serde_json::json!([80, 443]));
        assert_eq!(line["count"], 2);
        assert_eq!(line["ok"], true);
        assert_eq!(line["node"], "h1");
        assert_eq!(line["message"], "started");
        assert_eq!(line["level"], "INFO");
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(
            line["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("mesh_agent"))
        );
    }

    #[test]
    fn what_is_not_a_json_list_stays_a_string() {
        let addrs: Vec<std::net::SocketAddr> = vec!["10.0.0.2:7946".parse().unwrap()];
        let line = logged(|| tracing::warn!(addrs = ?addrs, path = %"[not json", "[1, 2]"));
        assert_eq!(line["addrs"], "[10.0.0.2:7946]");
        assert_eq!(line["path"], "[not json");
        // A message is text, whatever it looks like.
        assert_eq!(line["message"], "[1, 2]");
    }
}
