//! fnmatch(3)-style matching of modalias strings against alias patterns.
//!
//! Written by hand (it is small): kmod calls `fnmatch(pattern, modalias, 0)`,
//! so this implements exactly that flag-less dialect — `*` (any run, `/`
//! included), `?` (one character), `[...]` sets with ranges and `!`/`^`
//! negation, and `\` quoting the next character. It works on bytes (modalias
//! strings and alias patterns are ASCII) and must stay pure and
//! allocation-free: coldplug calls it ~26,000 times per modalias.

/// Whether `text` matches the fnmatch pattern `pattern` (flags 0).
pub fn fnmatch(pattern: &str, text: &str) -> bool {
    matches(pattern.as_bytes(), text.as_bytes())
}

fn matches(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where to resume after the most recent `*`: (pattern index after the
    // star, text index the star currently swallows up to). One backtrack
    // point is enough — a later star supersedes an earlier one.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, ti));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => match class(p, pi, t[ti]) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                // An unclosed `[` is a literal, as in glibc.
                None => (t[ti] == b'[').then_some(pi + 1),
            },
            Some(b'\\') if pi + 1 < p.len() => (p[pi + 1] == t[ti]).then_some(pi + 2),
            Some(&c) => (c == t[ti]).then_some(pi + 1),
            None => None,
        };
        match step {
            Some(next) => {
                pi = next;
                ti += 1;
            }
            None => match star {
                // Let the last star swallow one more character and retry.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    pi = sp;
                    ti = st + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the bracket expression starting at `p[start]` (a `[`).
/// Returns whether it matched and the index after the closing `]`, or `None`
/// if the expression is not closed.
fn class(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        // A `]` right after `[` (or `[!`) is a member, not the end.
        if lo == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        let (lo, after_lo) = if lo == b'\\' {
            (*p.get(i + 1)?, i + 2)
        } else {
            (lo, i + 1)
        };
        if p.get(after_lo) == Some(&b'-') && p.get(after_lo + 1).is_some_and(|&h| h != b']') {
            let (hi, after_hi) = if p[after_lo + 1] == b'\\' {
                (*p.get(after_lo + 2)?, after_lo + 3)
            } else {
                (p[after_lo + 1], after_lo + 2)
            };
            hit |= lo <= c && c <= hi;
            i = after_hi;
        } else {
            hit |= lo == c;
            i = after_lo;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fnmatch;

    #[test]
    fn literals_and_question_marks() {
        assert!(fnmatch("fs-efivarfs", "fs-efivarfs"));
        assert!(!fnmatch("fs-efivarfs", "fs-efivarf"));
        assert!(!fnmatch("fs-efivarf", "fs-efivarfs"));
        assert!(fnmatch("a?c", "abc"));
        assert!(!fnmatch("a?c", "ac"));
        assert!(fnmatch("", ""));
        assert!(!fnmatch("", "a"));
    }

    #[test]
    fn stars_backtrack() {
        assert!(fnmatch("*", ""));
        assert!(fnmatch("*", "anything/at:all"));
        assert!(fnmatch(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
        ));
        assert!(!fnmatch(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i01"
        ));
        assert!(fnmatch("a*b*c", "aXbYbZc"));
        assert!(!fnmatch("a*b*c", "aXbYbZ"));
        assert!(fnmatch("*ab", "aab"));
    }

    #[test]
    fn bracket_sets() {
        // Real pattern shapes from modules.alias (dmi and acpi aliases).
        assert!(fnmatch("acpi*:PNP0C0[ABC]:*", "acpi:PNP0C0A:"));
        assert!(!fnmatch("acpi*:PNP0C0[ABC]:*", "acpi:PNP0C0D:"));
        assert!(fnmatch("x[0-9]y", "x5y"));
        assert!(!fnmatch("x[0-9]y", "xay"));
        assert!(fnmatch("x[!0-9]y", "xay"));
        assert!(fnmatch("x[^0-9]y", "xay"));
        assert!(!fnmatch("x[!0-9]y", "x1y"));
        assert!(fnmatch("x[]]y", "x]y"));
        assert!(fnmatch("x[a-]y", "x-y"));
        // Unclosed bracket is a literal.
        assert!(fnmatch("x[ab", "x[ab"));
    }

    #[test]
    fn backslash_quotes() {
        assert!(fnmatch(r"a\*b", "a*b"));
        assert!(!fnmatch(r"a\*b", "aXb"));
        assert!(fnmatch(r"x[\]]y", "x]y"));
    }
}
