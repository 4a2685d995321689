//! Partial updates of a service: a JSON merge patch (RFC 7396). The CLI builds one
//! from its flags (and applies it to the defaults to create a service); the agent
//! applies one to the service as it is.

use serde_json::Value;

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
/// Written out rather than taken from a crate: it is the RFC's ten-line algorithm.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let fields = target.as_object_mut().expect("made an object above");
    for (key, value) in changes {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut v =
            json!({"a": 1, "h": {"check": "http", "path": "/x", "interval": "2s"}, "gone": 3});
        merge_patch(
            &mut v,
            &json!({"a": 2, "h": {"interval": "5s"}, "gone": null, "new": [1]}),
        );
        assert_eq!(
            v,
            json!({"a": 2, "h": {"check": "http", "path": "/x", "interval": "5s"}, "new": [1]})
        );
        merge_patch(&mut v, &json!({"h": "flat"}));
        assert_eq!(v["h"], "flat");
    }
}
