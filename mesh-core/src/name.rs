//! DNS label rules shared by service names, port names and task ids.

use crate::error::ModelError;

/// Checks that `value` is a lowercase DNS label (RFC 1123): 1 to 63 characters of
/// `a-z`, `0-9` and `-`, starting with a letter and not ending with `-`. Services must
/// be DNS names because the internal DNS answers them as `<name>.<domain>`.
pub fn check_label(field: &str, value: &str) -> Result<(), ModelError> {
    let err = |m: String| Err(ModelError::new(field, m));
    if value.is_empty() {
        return err("must not be empty".into());
    }
    if value.len() > 63 {
        return err(format!(
            "{value:?} is {} characters long; a DNS label has at most 63",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return err(format!(
            "{value:?} contains {c:?}; use lowercase letters, digits and '-' (a DNS label)"
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return err(format!("{value:?} must start with a letter"));
    }
    if value.ends_with('-') {
        return err(format!("{value:?} must not end with '-'"));
    }
    Ok(())
}

/// Task ids appear in metrics labels, CLI arguments and file names, so they are
/// restricted to a safe alphabet, but unlike service names they may contain dots
/// (`web.1`) and underscores.
pub fn check_task_id(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() || value.len() > 128 {
        return Err(ModelError::new(field, "must be 1 to 128 characters long"));
    }
    if value.starts_with('.') {
        return Err(ModelError::new(
            field,
            format!("{value:?} must not start with '.'"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(ModelError::new(
            field,
            format!("{value:?} contains {c:?}; use letters, digits, '.', '-' and '_'"),
        ));
    }
    Ok(())
}

/// A task address must be one a connection can go to: not unspecified (`0.0.0.0`,
/// `::`), not broadcast, not multicast.
pub fn check_task_ip(field: &str, ip: std::net::IpAddr) -> Result<(), ModelError> {
    let why = match ip {
        _ if ip.is_unspecified() => "is unspecified",
        _ if ip.is_multicast() => "is a multicast address",
        std::net::IpAddr::V4(v4) if v4.is_broadcast() => "is the broadcast address",
        _ => return Ok(()),
    };
    Err(ModelError::new(
        field,
        format!("{ip} {why}; a task needs the address it serves on"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_label("name", "web").is_ok());
        assert!(check_label("name", "web-2").is_ok());
        for bad in [
            "",
            "Web",
            "2web",
            "web-",
            "we_b",
            "web.mesh",
            &"a".repeat(64),
        ] {
            let e = check_label("name", bad).unwrap_err();
            assert_eq!(e.field, "name", "{bad:?}");
        }
    }

    #[test]
    fn task_ids() {
        assert!(check_task_id("id", "web.1").is_ok());
        assert!(check_task_id("id", "a/b").is_err());
        assert!(check_task_id("id", "").is_err());
        assert!(check_task_id("id", ".").is_err());
        assert!(check_task_id("id", "..").is_err());
    }

    #[test]
    fn task_ips() {
        for bad in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "::", "ff02::1"] {
            let e = check_task_ip("ip", bad.parse().unwrap()).unwrap_err();
            assert_eq!(e.field, "ip", "{bad}");
        }
        assert!(check_task_ip("ip", "10.0.0.1".parse().unwrap()).is_ok());
        assert!(check_task_ip("ip", "fd00::1".parse().unwrap()).is_ok());
    }
}
