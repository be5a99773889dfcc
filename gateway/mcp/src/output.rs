//! What reaches the model of a command's output: capped to a byte budget,
//! its head and tail kept (where errors and the final lines are), the
//! bytes left out said in place and counted. MCP clients put a tool's
//! result into the model's context whole; Claude Code stops at 25 000
//! tokens. Ember's own `limits.max_output_bytes` still bounds what the
//! guest may produce at all.

/// A text cut to a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capped {
    pub text: String,
    /// The bytes it had.
    pub total_bytes: usize,
    /// The bytes left out of `text` (0: whole).
    pub omitted_bytes: usize,
}

/// `text` whole if it fits in `budget` bytes, else its first and last
/// `budget / 2` bytes (on character boundaries) around a line that says
/// how much is left out.
pub fn cap(text: &str, budget: usize) -> Capped {
    let total_bytes = text.len();
    if total_bytes <= budget {
        return Capped { text: text.to_string(), total_bytes, omitted_bytes: 0 };
    }
    let mut head = budget / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = total_bytes - (budget - budget / 2);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    let omitted_bytes = tail - head;
    let text = format!("{}\n[... {omitted_bytes} bytes omitted ...]\n{}", &text[..head], &text[tail..]);
    Capped { text, total_bytes, omitted_bytes }
}

/// Budgets for two streams sharing `budget`: each gets half, and what one
/// does not use goes to the other.
pub fn split(budget: usize, a: usize, b: usize) -> (usize, usize) {
    let half = budget / 2;
    match (a <= half, b <= budget - half) {
        (true, _) => (a, budget - a),
        (false, true) => (budget - b, b),
        (false, false) => (half, budget - half),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_fits_is_whole() {
        let c = cap("hello\n", 6);
        assert_eq!((c.text.as_str(), c.total_bytes, c.omitted_bytes), ("hello\n", 6, 0));
    }

    #[test]
    fn head_and_tail_are_kept_with_the_count() {
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let c = cap(&text, 100);
        assert!(c.text.starts_with("line 0\nline 1\n"), "{}", c.text);
        assert!(c.text.ends_with("line 999\n"), "{}", c.text);
        assert_eq!(c.total_bytes, text.len());
        assert_eq!(c.omitted_bytes, text.len() - 100);
        assert!(c.text.contains(&format!("[... {} bytes omitted ...]", text.len() - 100)));
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let text = "é".repeat(100); // 2 bytes each
        for budget in [1, 2, 3, 9, 51] {
            let c = cap(&text, budget);
            let kept = c.total_bytes - c.omitted_bytes;
            assert!(kept <= budget + 1, "budget {budget}: kept {kept}");
            let marker = format!("\n[... {} bytes omitted ...]\n", c.omitted_bytes);
            let (head, tail) = c.text.split_once(&marker).unwrap();
            assert!(head.chars().chain(tail.chars()).all(|ch| ch == 'é'), "{}", c.text);
        }
        assert_eq!(cap("", 0).text, "");
    }

    #[test]
    fn two_streams_share_a_budget() {
        assert_eq!(split(100, 10, 500), (10, 90));
        assert_eq!(split(100, 500, 10), (90, 10));
        assert_eq!(split(100, 500, 500), (50, 50));
        assert_eq!(split(100, 10, 20), (10, 90));
    }
}
