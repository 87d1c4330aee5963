//! Names and relative paths from a sender, made safe before anything is written with them.
//!
//! A hostile sender controls every name in its file list. Whatever it sends, the result is a
//! list of plain components that stays inside the folder the receiver chose: no `..` or `.`, no
//! absolute or drive paths, no separators inside a component, no control characters, no names
//! Windows reserves (`CON`, `NUL`, `COM1`…), no trailing dots or spaces, bounded lengths.

/// Longest component kept, in bytes (file systems allow 255).
const MAX_COMPONENT: usize = 200;
/// Deepest folder nesting kept; deeper components are folded into the last folder's name.
const MAX_DEPTH: usize = 32;

/// The safe components of `path` (slash- or backslash-separated) ending in a file name. Falls
/// back to `name`, then to "file", when nothing usable is left.
pub fn safe_path(path: &str, name: &str) -> Vec<String> {
    let mut parts: Vec<String> = path.split(['/', '\\']).filter_map(safe_component).collect();
    if parts.is_empty() {
        parts.push(safe_name(name));
    }
    if parts.len() > MAX_DEPTH {
        let tail = parts.split_off(MAX_DEPTH - 1).join("_");
        parts.push(truncate(&tail));
    }
    parts
}

/// A safe single file name (no folders) for `name`.
pub fn safe_name(name: &str) -> String {
    name.split(['/', '\\'])
        .filter_map(safe_component)
        .next_back()
        .unwrap_or_else(|| "file".to_owned())
}

/// One component made safe, or `None` when nothing of it should be kept ("", ".", "..").
fn safe_component(raw: &str) -> Option<String> {
    let cleaned: String = raw
        .chars()
        .map(|c| match c {
            c if c.is_control() => '_',
            '<' | '>' | ':' | '"' | '|' | '?' | '*' => '_',
            c => c,
        })
        .collect();
    let trimmed = cleaned.trim().trim_end_matches(['.', ' ']);
    if trimmed.is_empty() || trimmed.chars().all(|c| c == '.') {
        return None;
    }
    let mut out = trimmed.to_owned();
    if is_reserved(&out) {
        out.insert(0, '_');
    }
    Some(truncate(&out))
}

/// Windows device names, with or without an extension.
fn is_reserved(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or("").to_ascii_uppercase();
    matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit())
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_COMPONENT {
        return s.to_owned();
    }
    let mut end = MAX_COMPONENT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The path as shown and as written into a ZIP: safe components joined by `/`.
pub fn display_path(path: &str, name: &str) -> String {
    safe_path(path, name).join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_are_kept() {
        assert_eq!(
            safe_path("photos/2024/a.jpg", "a.jpg"),
            ["photos", "2024", "a.jpg"]
        );
        assert_eq!(safe_path("", "naïve résumé ✓.txt"), ["naïve résumé ✓.txt"]);
        assert_eq!(display_path("a/b/c.txt", "c.txt"), "a/b/c.txt");
    }

    #[test]
    fn hostile_paths_stay_inside_the_folder() {
        for (path, want) in [
            ("../../etc/passwd", vec!["etc", "passwd"]),
            ("/etc/passwd", vec!["etc", "passwd"]),
            (
                "C:\\Windows\\system32\\x.dll",
                vec!["C_", "Windows", "system32", "x.dll"],
            ),
            ("a/./b/../c", vec!["a", "b", "c"]),
            ("..\\..\\x", vec!["x"]),
            ("dir/....//x", vec!["dir", "x"]),
            ("a\u{0}b/c\nd", vec!["a_b", "c_d"]),
            ("CON/nul.txt/com1", vec!["_CON", "_nul.txt", "_com1"]),
            ("trail. /x. ", vec!["trail", "x"]),
        ] {
            let got = safe_path(path, "fallback");
            assert_eq!(got, want, "{path:?}");
            for part in &got {
                assert!(!part.contains(['/', '\\']) && part != ".." && part != ".");
                assert!(!part.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn nothing_usable_falls_back_to_the_name_then_to_file() {
        assert_eq!(safe_path("../..", "x.bin"), ["x.bin"]);
        assert_eq!(safe_path("", "../.."), ["file"]);
        assert_eq!(safe_name("a/b/../c.txt"), "c.txt");
        assert_eq!(safe_name(""), "file");
    }

    #[test]
    fn lengths_and_depth_are_bounded() {
        let long = "é".repeat(300);
        let got = safe_path(&long, "x");
        assert!(got[0].len() <= MAX_COMPONENT && got[0].starts_with('é'));
        let deep = vec!["d"; 100].join("/");
        let got = safe_path(&deep, "x");
        assert_eq!(got.len(), MAX_DEPTH);
    }
}
