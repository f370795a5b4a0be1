//! A unified diff of two small texts, for `configure --dry-run`. The files it compares are a few
//! dozen lines, so a quadratic longest-common-subsequence table is cheap and keeps a diff crate
//! out of the build.

/// Lines of context around each change, as `diff -u` prints.
const CONTEXT: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep,
    Remove,
    Add,
}

/// `diff -u`-style text from `old` to `new`, headed `--- old_name` / `+++ new_name`; empty when
/// they are equal.
pub fn unified(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    if old == new {
        return String::new();
    }
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: length of the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // The edit script, removals before additions where both would do (as diff prints them).
    let mut script: Vec<(Op, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            script.push((Op::Keep, a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            script.push((Op::Remove, a[i]));
            i += 1;
        } else {
            script.push((Op::Add, b[j]));
            j += 1;
        }
    }
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    let changed: Vec<usize> = (0..script.len())
        .filter(|&k| script[k].0 != Op::Keep)
        .collect();
    let mut k = 0;
    while k < changed.len() {
        // A hunk runs from CONTEXT lines before a change to CONTEXT lines after the last change
        // that lies within 2 * CONTEXT of the previous one.
        let start = changed[k].saturating_sub(CONTEXT);
        let mut last = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= last + 2 * CONTEXT + 1 {
            k += 1;
            last = changed[k];
        }
        let end = (last + CONTEXT + 1).min(script.len());
        let old_before = script[..start].iter().filter(|s| s.0 != Op::Add).count();
        let new_before = script[..start].iter().filter(|s| s.0 != Op::Remove).count();
        let old_len = script[start..end].iter().filter(|s| s.0 != Op::Add).count();
        let new_len = script[start..end]
            .iter()
            .filter(|s| s.0 != Op::Remove)
            .count();
        let from = |before: usize, len: usize| if len == 0 { before } else { before + 1 };
        out.push_str(&format!(
            "@@ -{},{old_len} +{},{new_len} @@\n",
            from(old_before, old_len),
            from(new_before, new_len)
        ));
        for (op, line) in &script[start..end] {
            let sign = match op {
                Op::Keep => ' ',
                Op::Remove => '-',
                Op::Add => '+',
            };
            out.push(sign);
            out.push_str(line);
            out.push('\n');
        }
        k += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::unified;

    #[test]
    fn a_changed_line_shows_with_its_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\n";
        let new = "a\nb\nc\nd\nE\nf\ng\nh\n";
        assert_eq!(
            unified(old, new, "x", "x"),
            "--- x\n+++ x\n@@ -2,7 +2,7 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n"
        );
    }

    #[test]
    fn a_new_file_is_all_additions() {
        assert_eq!(
            unified("", "one\ntwo\n", "/dev/null", "f"),
            "--- /dev/null\n+++ f\n@@ -0,0 +1,2 @@\n+one\n+two\n"
        );
    }

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified("same\n", "same\n", "a", "b"), "");
    }
}
