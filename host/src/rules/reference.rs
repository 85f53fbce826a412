//! A deliberately simple reference interpreter of the pattern language, for
//! tests: brute force over the event's leaves, no indexes, no shortcuts.

use super::pattern::{Condition, Pattern, Scalar};

/// A JSON value that keeps number text.
#[derive(Debug, Clone)]
pub enum J {
    Str(String),
    Num(String),
    Bool(bool),
    Null,
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn to_json(&self) -> String {
        match self {
            J::Str(s) => serde_json::Value::from(s.as_str()).to_string(),
            J::Num(n) => n.clone(),
            J::Bool(b) => b.to_string(),
            J::Null => "null".into(),
            J::Arr(items) => {
                let items: Vec<String> = items.iter().map(J::to_json).collect();
                format!("[{}]", items.join(","))
            }
            J::Obj(fields) => {
                let fields: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| {
                        format!("{}:{}", serde_json::Value::from(k.as_str()), v.to_json())
                    })
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }
}

struct RLeaf<'a> {
    path: Vec<&'a str>,
    value: &'a J,
    /// (array id, index) of the arrays of objects around it.
    trail: Vec<(usize, usize)>,
}

fn flatten<'a>(
    v: &'a J,
    path: &mut Vec<&'a str>,
    trail: &mut Vec<(usize, usize)>,
    keep: usize,
    next_id: &mut usize,
    out: &mut Vec<RLeaf<'a>>,
) {
    match v {
        J::Obj(fields) => {
            for (k, child) in fields {
                path.push(k);
                let keep = trail.len();
                flatten(child, path, trail, keep, next_id, out);
                path.pop();
            }
        }
        J::Arr(items) => {
            let id = *next_id;
            *next_id += 1;
            for (i, item) in items.iter().enumerate() {
                trail.push((id, i));
                flatten(item, path, trail, keep, next_id, out);
                trail.pop();
            }
        }
        scalar => out.push(RLeaf {
            path: path.clone(),
            value: scalar,
            trail: trail[..keep].to_vec(),
        }),
    }
}

fn scalar(j: &J) -> Scalar<'_> {
    match j {
        J::Str(s) => Scalar::Str(s),
        J::Num(n) => Scalar::Num(n),
        J::Bool(b) => Scalar::Bool(*b),
        _ => Scalar::Null,
    }
}

/// Two leaves can be used together unless they sit in different elements of
/// one array.
fn compatible(a: &RLeaf<'_>, b: &RLeaf<'_>) -> bool {
    a.trail
        .iter()
        .all(|(id, i)| b.trail.iter().all(|(id2, i2)| id != id2 || i == i2))
}

fn holds(c: &Condition, leaf: &J) -> bool {
    match (c, leaf) {
        (Condition::Wildcard(w), J::Str(s)) => glob(&w.pieces, s),
        _ => c.test(&scalar(leaf)),
    }
}

/// Recursive glob: pieces separated by `*`.
fn glob(pieces: &[String], s: &str) -> bool {
    match pieces {
        [] => s.is_empty(),
        [only] => s == only,
        [first, rest @ ..] => {
            let Some(tail) = s.strip_prefix(first.as_str()) else {
                return false;
            };
            // The star before `rest` eats `tail[..i]`.
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// Whether `event` matches `pattern`.
pub fn matches(pattern: &Pattern, event: &J) -> bool {
    let mut leaves = Vec::new();
    let mut next_id = 0;
    flatten(
        event,
        &mut Vec::new(),
        &mut Vec::new(),
        0,
        &mut next_id,
        &mut leaves,
    );
    pattern.alternatives().iter().any(|conj| {
        // Every slot: the leaves at its path, and which of them match.
        let options: Vec<Vec<Option<usize>>> = conj
            .slots
            .iter()
            .map(|slot| {
                let mut o: Vec<Option<usize>> = leaves
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| {
                        l.path.len() == slot.path.len()
                            && l.path.iter().zip(&slot.path).all(|(a, b)| a == b)
                            && slot.conds.iter().any(|c| holds(c, l.value))
                    })
                    .map(|(i, _)| Some(i))
                    .collect();
                if slot.absent_ok() {
                    o.push(None);
                }
                o
            })
            .collect();
        // Every combination.
        let mut pick = vec![0usize; options.len()];
        if options.iter().any(|o| o.is_empty()) {
            return false;
        }
        loop {
            let chosen: Vec<Option<usize>> =
                pick.iter().zip(&options).map(|(&i, o)| o[i]).collect();
            let used: Vec<&RLeaf<'_>> = chosen.iter().flatten().map(|&i| &leaves[i]).collect();
            let pairwise = used.iter().all(|a| used.iter().all(|b| compatible(a, b)));
            let absences = conj.slots.iter().zip(&chosen).all(|(slot, c)| {
                c.is_some()
                    || !leaves.iter().any(|l| {
                        l.path.len() == slot.path.len()
                            && l.path.iter().zip(&slot.path).all(|(a, b)| a == b)
                            && used.iter().all(|u| compatible(l, u))
                    })
            });
            if pairwise && absences {
                return true;
            }
            // Next combination.
            let mut k = 0;
            loop {
                if k == pick.len() {
                    return false;
                }
                pick[k] += 1;
                if pick[k] < options[k].len() {
                    break;
                }
                pick[k] = 0;
                k += 1;
            }
        }
    })
}
