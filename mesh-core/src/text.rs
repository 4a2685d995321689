//! Cutting text to a byte budget without splitting a character.

/// Cuts `text` to at most `max` bytes, at a character boundary; returns whether it
/// cut anything.
pub fn truncate_at_char(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let cut = (0..=max)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    text.truncate(cut);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary_and_says_so() {
        let mut s = "héllo".to_string();
        assert!(truncate_at_char(&mut s, 2));
        assert_eq!(s, "h");
        let mut t = "abc".to_string();
        assert!(!truncate_at_char(&mut t, 3));
        assert_eq!(t, "abc");
    }
}
