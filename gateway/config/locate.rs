//! Where a key path (`agents[0].upstream`, `policies.standard.requests.per`) sits in a YAML
//! file, so a validation error can name its line and column. Best effort: it reads the block
//! style operators write (and flow mappings kept on one line); when a path cannot be
//! followed to the end it answers with the deepest part it found.

/// A file's lines, split once for every path looked up in it.
pub struct Locator<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            lines: text.lines().collect(),
        }
    }

    /// 1-based line and column of `path`.
    pub fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let lines = &self.lines;
        let mut found = None;
        let mut scope = Scope::Block {
            from: 0,
            to: lines.len(),
            item_indent: None,
        };
        for segment in segments(path) {
            let step = match (&scope, segment) {
                (Scope::Inline { line }, Segment::Key(name)) => inline_key(lines[*line], name)
                    .map(|column| ((*line + 1, column + 1), Scope::Inline { line: *line })),
                // An item of a one-line sequence: the line's key is as close as it gets.
                (Scope::Inline { .. }, Segment::Index(_)) => None,
                (
                    Scope::Block {
                        from,
                        to,
                        item_indent,
                    },
                    Segment::Key(name),
                ) => find_key(lines, *from, *to, *item_indent, name),
                (Scope::Block { from, to, .. }, Segment::Index(n)) => {
                    find_item(lines, *from, *to, n)
                }
            };
            let Some((hit, next)) = step else { break };
            found = Some(hit);
            scope = next;
        }
        found
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> impl Iterator<Item = Segment<'_>> {
    path.split('.').flat_map(|part| {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        let index = rest.trim_end_matches(']').parse().ok();
        let key = (!name.is_empty()).then_some(Segment::Key(name));
        key.into_iter().chain(index.map(Segment::Index))
    })
}

/// What the next path segment is looked up in.
enum Scope {
    /// Lines `from..to`; the first may be a list item's line, whose entry starts after the
    /// dash, at `item_indent`.
    Block {
        from: usize,
        to: usize,
        item_indent: Option<usize>,
    },
    /// A flow mapping or sequence written on one line.
    Inline { line: usize },
}

/// Indentation and text of a line that holds YAML, not a blank or a comment.
fn content(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    Some((line.len() - trimmed.len(), trimmed))
}

/// Where the entry on line `i` starts, minding a list item's dash on the scope's first line.
fn entry<'a>(
    lines: &[&'a str],
    from: usize,
    item_indent: Option<usize>,
    i: usize,
) -> Option<(usize, &'a str)> {
    match item_indent {
        Some(indent) if i == from => lines[i].get(indent..).map(|text| (indent, text)),
        _ => content(lines[i]),
    }
}

fn find_key(
    lines: &[&str],
    from: usize,
    to: usize,
    item_indent: Option<usize>,
    name: &str,
) -> Option<((usize, usize), Scope)> {
    let child_indent =
        (from..to).find_map(|i| entry(lines, from, item_indent, i).map(|(indent, _)| indent))?;
    for i in from..to {
        let Some((indent, text)) = entry(lines, from, item_indent, i) else {
            continue;
        };
        if indent != child_indent {
            continue;
        }
        let Some(value) = text
            .trim_start_matches('"')
            .strip_prefix(name)
            .map(|r| r.trim_start_matches('"'))
        else {
            continue;
        };
        let Some(value) = value.strip_prefix(':') else {
            continue;
        };
        let hit = (i + 1, indent + 1);
        if value.trim_start().starts_with(['{', '[']) {
            return Some((hit, Scope::Inline { line: i }));
        }
        let end = (i + 1..to)
            .find(|&j| content(lines[j]).is_some_and(|(ind, _)| ind <= child_indent))
            .unwrap_or(to);
        let next = Scope::Block {
            from: i + 1,
            to: end,
            item_indent: None,
        };
        return Some((hit, next));
    }
    None
}

/// Column of `name:` inside a flow mapping on `line`.
fn inline_key(line: &str, name: &str) -> Option<usize> {
    let mut search = 0;
    while let Some(at) = line[search..].find(name) {
        let start = search + at;
        let quoted_start = if line[..start].ends_with('"') {
            start - 1
        } else {
            start
        };
        let before = line[..quoted_start].chars().last();
        let after = line[start + name.len()..].trim_start_matches('"');
        if matches!(before, Some('{' | ',' | ' ')) && after.starts_with(':') {
            return Some(quoted_start);
        }
        search = start + name.len();
    }
    None
}

fn find_item(lines: &[&str], from: usize, to: usize, n: usize) -> Option<((usize, usize), Scope)> {
    let dashes: Vec<(usize, usize)> = (from..to)
        .filter_map(|i| {
            let (indent, text) = content(lines[i])?;
            (text.starts_with("- ") || text == "-").then_some((i, indent))
        })
        .collect();
    let item_indent = dashes.first()?.1;
    let items: Vec<usize> = dashes
        .into_iter()
        .filter(|&(_, ind)| ind == item_indent)
        .map(|(i, _)| i)
        .collect();
    let line = *items.get(n)?;
    let end = items.get(n + 1).copied().unwrap_or(to);
    let after_dash = &lines[line][item_indent + 1..];
    let value_indent = item_indent + 1 + (after_dash.len() - after_dash.trim_start().len());
    let next = if after_dash.trim_start().starts_with(['{', '[']) {
        Scope::Inline { line }
    } else {
        Scope::Block {
            from: line,
            to: end,
            item_indent: Some(value_indent),
        }
    };
    Some(((line + 1, item_indent + 1), next))
}

#[cfg(test)]
mod tests {
    use super::Locator;

    fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
        Locator::new(text).locate(path)
    }

    const CONFIG: &str = "\
listen: \"0.0.0.0:8080\"
upstreams:
  pool:
    endpoints: [\"127.0.0.1:9001\"]
    timeout: soon
agents:
  - id: ag_one
    upstream: pool
  - id: ag_two
    upstream: nowhere
    pricing: {input_per_mtok: 1, output_per_mtok: 2, reserve: -1}
keys:
  - {id: key_a, sha256: \"abc\", account: acct, agents: \"*\"}
";

    #[test]
    fn key_paths_table() {
        let cases = [
            ("listen", Some((1, 1))),
            ("upstreams.pool.timeout", Some((5, 5))),
            ("upstreams.pool.endpoints[0]", Some((4, 5))),
            ("agents[0].id", Some((7, 5))),
            ("agents[1].upstream", Some((10, 5))),
            ("agents[1].pricing.reserve", Some((11, 54))),
            ("keys[0].sha256", Some((13, 17))),
            ("keys[0].account", Some((13, 32))),
            ("agents[5].id", Some((6, 1))),
            ("nothing", None),
        ];
        for (path, expected) in cases {
            assert_eq!(locate(CONFIG, path), expected, "{path}");
        }
    }

    #[test]
    fn odd_text_never_panics() {
        use rand::{Rng, SeedableRng};
        const PIECES: [&str; 16] = [
            "- ", ":", "{", "}", "[", "]", "\"", " ", "\n", "é", "\u{a0}", "#", ",", "a", "agents",
            "  ",
        ];
        let paths = [
            "a",
            "agents[0].a",
            "a.a[1]",
            "agents[2].é",
            "[0]",
            "a..a",
            "agents[x]",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..40);
            let text: String = (0..len)
                .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
                .collect();
            for path in paths {
                let _ = locate(&text, path);
            }
        }
    }

    #[test]
    fn policy_files() {
        let text =
            "policies:\n  standard:\n    requests: {rate: -5, per: soon}\n    concurrency: 0\n";
        assert_eq!(
            locate(text, "policies.standard.requests.per"),
            Some((3, 26))
        );
        assert_eq!(locate(text, "policies.standard.concurrency"), Some((4, 5)));
    }
}
