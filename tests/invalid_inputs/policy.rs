//! Gate files and head policies (DuoAttention / RLKV), HeadKV score files and the budget
//! policies. Part of tests/invalid_inputs.rs.

use super::*;

/// A valid gate file: rows of values (some outside [0, 1], clipped by the parser), written with
/// assorted separators, number formats, blank lines and line endings.
#[derive(Clone, Debug)]
pub(super) struct Tsv {
    pub(super) rows: Vec<Vec<String>>,
    pub(super) seps: Vec<&'static str>,
    pub(super) blank_before: Vec<bool>,
    pub(super) crlf: bool,
}

impl Tsv {
    pub(super) fn render(&self) -> (String, Vec<usize>) {
        let nl = if self.crlf { "\r\n" } else { "\n" };
        let (mut text, mut line_of, mut line) = (String::new(), Vec::new(), 1);
        for (r, row) in self.rows.iter().enumerate() {
            if self.blank_before[r] {
                text += nl;
                line += 1;
            }
            text += &row.join(self.seps[r]);
            text += nl;
            line_of.push(line);
            line += 1;
        }
        (text, line_of)
    }
}

pub(super) fn number() -> impl Strategy<Value = String> {
    (-0.5f64..1.5, 0u8..4).prop_map(|(x, f)| match f {
        0 => format!("{x}"),
        1 => format!("{x:e}"),
        2 => format!("{x:.3}"),
        _ => format!("{:+.2E}", x),
    })
}

pub(super) fn tsv() -> impl Strategy<Value = Tsv> {
    (1usize..5, 1usize..6)
        .prop_flat_map(|(l, h)| {
            (
                prop::collection::vec(prop::collection::vec(number(), h), l),
                prop::collection::vec(prop::sample::select(vec!["\t", " ", "  ", "\t "]), l),
                prop::collection::vec(prop::bool::weighted(0.2), l),
                any::<bool>(),
            )
        })
        .prop_map(|(rows, seps, blank_before, crlf)| Tsv { rows, seps, blank_before, crlf })
}

#[derive(Clone, Debug)]
pub(super) enum TsvFault {
    None,
    Empty(&'static str),
    Ragged(usize, bool),
    NotANumber(usize, usize, &'static str),
    NotFinite(usize, usize, &'static str),
    Truncated(usize),
    Garbage(String),
    Huge(usize, usize),
}

pub(super) fn tsv_fault() -> impl Strategy<Value = TsvFault> {
    let bad = ["abc", "0.5.5", "1,5", "--1", "0x10", "1e", "e5", "+-1", ".", "-", "1_000", "½", "0.5;"];
    let non_finite = ["nan", "NaN", "inf", "-inf", "+infinity", "1e400", "-1e999", "Infinity"];
    prop_oneof![
        Just(TsvFault::None),
        prop::sample::select(vec!["", "\n", "\n\n  \t\n", "\r\n", " "]).prop_map(TsvFault::Empty),
        (0usize..5, any::<bool>()).prop_map(|(r, add)| TsvFault::Ragged(r, add)),
        (0usize..5, 0usize..6, prop::sample::select(bad.to_vec()))
            .prop_map(|(r, c, t)| TsvFault::NotANumber(r, c, t)),
        (0usize..5, 0usize..6, prop::sample::select(non_finite.to_vec()))
            .prop_map(|(r, c, t)| TsvFault::NotFinite(r, c, t)),
        any::<usize>().prop_map(TsvFault::Truncated),
        "[0-9a-z.eE+ \t\r\n-]{0,60}".prop_map(TsvFault::Garbage),
        (1usize..20, 1usize..200).prop_map(|(l, h)| TsvFault::Huge(l, h)),
    ]
}

/// The field a gate file's first fault must be reported under, from the documented format:
/// lines, trimmed; fields split on tabs and spaces; finite floats; every row as wide as the
/// first; at least one row.
pub(super) fn tsv_first_fault(text: &str) -> Option<String> {
    let mut width = None;
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.trim().split(['\t', ' ']).filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            continue;
        }
        for (j, f) in fields.iter().enumerate() {
            if !f.parse::<f64>().is_ok_and(f64::is_finite) {
                return Some(format!("gates line {} column {}", i + 1, j + 1));
            }
        }
        match width {
            None => width = Some(fields.len()),
            Some(w) if w != fields.len() => return Some(format!("gates line {}", i + 1)),
            _ => {}
        }
    }
    width.is_none().then(|| "gates".to_string())
}

pub(super) fn gates_parse_tsv(b: &mut Battery) {
    b.run("HeadGates::parse_tsv", 15_000, (tsv(), tsv_fault()), |p, (mut tsv, fault)| {
        let (layers, width) = (tsv.rows.len(), tsv.rows[0].len());
        let (text, expect) = match fault {
            TsvFault::None => (tsv.render().0, Expect::Ok),
            TsvFault::Empty(t) => (t.to_string(), invalid("gates")),
            TsvFault::Ragged(r, add) => {
                let r = r % layers;
                if add || width == 1 {
                    tsv.rows[r].push("0.5".into());
                } else {
                    tsv.rows[r].pop();
                }
                let (text, line_of) = tsv.render();
                // Rows are compared with the first: changing the first puts the second at fault.
                let expect = match r {
                    0 if layers == 1 => Expect::Ok,
                    0 => invalid(format!("gates line {}", line_of[1])),
                    _ => invalid(format!("gates line {}", line_of[r])),
                };
                (text, expect)
            }
            TsvFault::NotANumber(r, c, tok) | TsvFault::NotFinite(r, c, tok) => {
                let (r, c) = (r % layers, c % width);
                tsv.rows[r][c] = tok.to_string();
                let (text, line_of) = tsv.render();
                (text, invalid(format!("gates line {} column {}", line_of[r], c + 1)))
            }
            TsvFault::Truncated(at) => {
                let text = tsv.render().0;
                let text = text[..at % text.len()].to_string(); // ASCII: every cut is a boundary
                let expect = tsv_first_fault(&text).map_or(Expect::Ok, invalid);
                (text, expect)
            }
            TsvFault::Garbage(text) => {
                let expect = tsv_first_fault(&text).map_or(Expect::Ok, invalid);
                (text, expect)
            }
            TsvFault::Huge(l, h) => {
                let row = vec!["0.25"; h].join("\t");
                (vec![row; l].join("\n"), Expect::Ok)
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(g) = p.call(expect, || HeadGates::parse_tsv(&text))? {
            check(ok && g.layers() >= 1 && g.kv_heads() >= 1, || "empty gates accepted".into())?;
            let all_clipped =
                (0..g.layers()).all(|l| (0..g.kv_heads()).all(|h| (0.0..=1.0).contains(&g.gate(l, h))));
            check(all_clipped, || format!("unclipped gates from {text:?}"))?;
        }
        Ok(())
    });
}

pub(super) fn gates() -> HeadGates {
    HeadGates::parse_tsv("0.9\t0.1\t0.5\n0.5\t1.0\t0.0\n0.3\t0.7\t0.2\n").unwrap()
}

pub(super) fn gates_select_full(b: &mut Battery) {
    let sparsity = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-f64::MIN_POSITIVE),
        Just(1.0 + f64::EPSILON),
        -1e300f64..0.0,
        1.0f64..1e300,
        0.0f64..=1.0,
        Just(-0.0),
    ];
    let g = gates();
    b.run("HeadGates::select_full", 5_000, sparsity, |p, s| {
        let expect = if (0.0..=1.0).contains(&s) { Expect::Ok } else { invalid("sparsity") };
        if let Some(full) = p.call(expect, || g.select_full(s))? {
            check(full.count_full() >= 1, || format!("sparsity {s}: no full head left"))?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
pub(super) enum HeadLayoutFault {
    None,
    Layer(usize),
    WindowZero,
    HugeContext(usize, u32),
    HugeHeadroom(u32),
    NoSequences,
}

pub(super) fn full_heads_layer_layout(b: &mut Battery) {
    let fault = prop_oneof![
        Just(HeadLayoutFault::None),
        prop_oneof![3usize..100, Just(usize::MAX)].prop_map(HeadLayoutFault::Layer),
        Just(HeadLayoutFault::WindowZero),
        (0usize..4, 0u32..16).prop_map(|(s, x)| HeadLayoutFault::HugeContext(s, x)),
        (0u32..16).prop_map(HeadLayoutFault::HugeHeadroom),
        Just(HeadLayoutFault::NoSequences),
    ];
    let full = gates().select_full(0.5).unwrap();
    let lens = prop::collection::vec(0u32..100, 1..4);
    let size = (0u32..20, 1u32..20).prop_map(|(sink, window)| StreamingSize { sink, window });
    b.run(
        "FullHeads::layer_layout",
        5_000,
        (0usize..3, lens, 0u32..8, size, fault),
        |p, (layer, mut lens, mut headroom, mut size, fault)| {
            let mut layer = layer;
            let expect = match fault {
                HeadLayoutFault::None => Expect::Ok,
                HeadLayoutFault::Layer(l) => {
                    layer = l;
                    invalid("layer")
                }
                HeadLayoutFault::WindowZero => {
                    size.window = 0;
                    invalid("size.window")
                }
                HeadLayoutFault::HugeContext(s, x) => {
                    let s = s % lens.len();
                    lens[s] = u32::MAX - x;
                    packed_overflow(&full, layer, &lens, headroom, size)
                }
                HeadLayoutFault::HugeHeadroom(x) => {
                    headroom = u32::MAX - x;
                    packed_overflow(&full, layer, &lens, headroom, size)
                }
                HeadLayoutFault::NoSequences => {
                    lens.clear();
                    invalid("batch")
                }
            };
            let ok = matches!(expect, Expect::Ok);
            if let Some(l) = p.call(expect, || full.layer_layout(layer, &lens, headroom, size))? {
                check(ok && l.segments().len() == lens.len() * full.kv_heads(), || format!("{l:?}"))?;
            }
            Ok(())
        },
    );
}

/// The first segment of a head-policy layout whose packed rows pass `MAX_ROWS`, if any.
pub(super) fn packed_overflow(
    full: &FullHeads,
    layer: usize,
    lens: &[u32],
    headroom: u32,
    size: StreamingSize,
) -> Expect {
    let mut total = 0u64;
    for (b, &len) in lens.iter().enumerate() {
        for h in 0..full.kv_heads() {
            total += if full.is_full(layer, h) {
                u64::from(len) + u64::from(headroom)
            } else {
                u64::from(size.sink) + u64::from(size.window)
            };
            if total > MAX_ROWS {
                return invalid(format!("segments[{}]", b * full.kv_heads() + h));
            }
        }
    }
    Expect::Ok
}

pub(super) fn full_heads_all_full(b: &mut Battery) {
    let dims = prop_oneof![
        40 => (1usize..100, 1usize..100),
        // The bound itself allocates a million flags: rare.
        1 => Just((1usize << 10, 1usize << 10)),
        20 => Just((1usize << 10, (1usize << 10) + 1)),
        20 => (1usize << 12..1 << 20, 1usize << 13..1 << 20),
        20 => (usize::MAX / 2..usize::MAX, 2usize..1000),
        20 => (2usize..1000, usize::MAX / 2..usize::MAX),
    ];
    b.run("FullHeads::all_full", 2_000, dims, |p, (layers, kv_heads)| {
        let small = layers.checked_mul(kv_heads).is_some_and(|n| n <= MAX_HEADS);
        let expect = if small { Expect::Ok } else { invalid("layers * kv_heads") };
        if let Some(f) = p.call(expect, || FullHeads::all_full(layers, kv_heads))? {
            check(f.count_full() == layers * kv_heads, || "not all full".into())?;
        }
        Ok(())
    });
}

/// One key of a DuoAttention config.json.
#[derive(Clone, Debug)]
pub(super) enum ConfigValue {
    Missing,
    Null,
    Count(u32),
    Bad(&'static str),
}

pub(super) fn config_value() -> impl Strategy<Value = ConfigValue> {
    let bad = ["-1", "2.5", "\"64\"", "true", "[]", "{}", "4294967296", "1e20", "-0.5", "[64]"];
    prop_oneof![
        Just(ConfigValue::Missing),
        Just(ConfigValue::Null),
        prop_oneof![0u32..600, Just(u32::MAX)].prop_map(ConfigValue::Count),
        prop::sample::select(bad.to_vec()).prop_map(ConfigValue::Bad),
    ]
}

pub(super) fn duo_config(b: &mut Battery) {
    let keys = ["sink_size", "recent_size", "deploy_sink_size", "deploy_recent_size"];
    let text_fault = prop_oneof![
        Just(None),
        any::<usize>().prop_map(Some), // truncate the text there
    ];
    let values = prop::collection::vec(config_value(), 4);
    let shape = prop_oneof![
        4 => Just("object"),
        1 => prop::sample::select(vec!["[]", "5", "null", "\"config\"", "[{\"sink_size\": 4}]", ""]),
    ];
    b.run("duo_attention_config", 8_000, (values, text_fault, shape), |p, (values, cut, shape)| {
        let (text, expect) = if shape != "object" {
            let expect =
                if shape.is_empty() { invalid("config.json") } else { invalid("config.json sink_size") };
            (shape.to_string(), expect)
        } else {
            let fields: Vec<String> = std::iter::once("\"model_name\": \"m\"".to_string())
                .chain(keys.iter().zip(&values).filter_map(|(k, v)| match v {
                    ConfigValue::Missing => None,
                    ConfigValue::Null => Some(format!("\"{k}\": null")),
                    ConfigValue::Count(n) => Some(format!("\"{k}\": {n}")),
                    ConfigValue::Bad(t) => Some(format!("\"{k}\": {t}")),
                }))
                .collect();
            let text = format!("{{{}}}", fields.join(", "));
            match cut {
                // Every proper prefix of a JSON object is malformed.
                Some(at) => (text[..at % text.len()].to_string(), invalid("config.json")),
                None => {
                    // The deploy key wins when present and not null; the error names the key read.
                    let read = |deploy: usize, train: usize| match &values[deploy] {
                        ConfigValue::Missing | ConfigValue::Null => (keys[train], &values[train]),
                        v => (keys[deploy], v),
                    };
                    let mut expect = Expect::Ok;
                    for (deploy, train) in [(2, 0), (3, 1)] {
                        let (key, v) = read(deploy, train);
                        let fault = match v {
                            ConfigValue::Count(0) if train == 1 => true,
                            ConfigValue::Count(_) => false,
                            _ => true,
                        };
                        if fault {
                            expect = invalid(format!("config.json {key}"));
                            break;
                        }
                    }
                    (text, expect)
                }
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(size) = p.call(expect, || duo_attention_config(&text))? {
            check(ok && size.window >= 1, || format!("{size:?} from {text}"))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// HeadKV score files and budgets.

/// A valid HeadKV score file: a full `layers x heads` grid, lists of 1..4 non-negative numbers.
#[derive(Clone, Debug)]
pub(super) struct Scores {
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) lists: Vec<Vec<f64>>,
}

impl Scores {
    pub(super) fn entries(&self) -> Vec<(String, String)> {
        (0..self.layers * self.heads)
            .map(|i| {
                let list: Vec<String> = self.lists[i].iter().map(|x| format!("{x}")).collect();
                (format!("{}-{}", i / self.heads, i % self.heads), format!("[{}]", list.join(", ")))
            })
            .collect()
    }
}

pub(super) fn render_json(entries: &[(String, String)]) -> String {
    let body: Vec<String> = entries.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
    format!("{{{}}}", body.join(", "))
}

pub(super) fn scores() -> impl Strategy<Value = Scores> {
    (1usize..4, 1usize..5).prop_flat_map(|(layers, heads)| {
        let list = prop::collection::vec(0.0f64..1.0, 1..4);
        prop::collection::vec(list, layers * heads).prop_map(move |lists| Scores { layers, heads, lists })
    })
}

#[derive(Clone, Debug)]
pub(super) enum ScoresFault {
    None,
    Truncated(usize),
    NotAnObject(&'static str),
    BadKey(usize, &'static str),
    IndexBeyondGrid(usize, usize),
    BadValue(usize, &'static str),
    Hole(usize),
    SameHeadTwice(usize, usize),
}

pub(super) fn scores_fault() -> impl Strategy<Value = ScoresFault> {
    let keys = [
        "a-b",
        "1",
        "1-",
        "-0",
        "0--1",
        "1-2-3",
        " 0-0",
        "0-0 ",
        "0-x",
        "",
        "\u{663}-0",
        "0-99999999999999999999",
    ];
    let values = [
        "[]",
        "1",
        "\"x\"",
        "null",
        "{}",
        "[1, \"x\"]",
        "[null]",
        "[[1]]",
        "[true]",
        "[1e300, 1e300]",
        "[1.7976931348623157e308, 1.7976931348623157e308]",
        "[-1e39]",
    ];
    prop_oneof![
        Just(ScoresFault::None),
        any::<usize>().prop_map(ScoresFault::Truncated),
        prop::sample::select(vec!["[]", "5", "\"x\"", "null", "[{\"0-0\": [1]}]", "{}", "", "NaN"])
            .prop_map(ScoresFault::NotAnObject),
        (0usize..16, prop::sample::select(keys.to_vec())).prop_map(|(i, k)| ScoresFault::BadKey(i, k)),
        (0u8..3, 0usize..4).prop_map(|(kind, x)| match kind {
            0 => ScoresFault::IndexBeyondGrid(usize::MAX - x, x),
            1 => ScoresFault::IndexBeyondGrid(x, usize::MAX),
            _ => ScoresFault::IndexBeyondGrid(x, x),
        }),
        (0usize..16, prop::sample::select(values.to_vec())).prop_map(|(i, v)| ScoresFault::BadValue(i, v)),
        (0usize..16).prop_map(ScoresFault::Hole),
        (0usize..16, 0usize..16).prop_map(|(i, j)| ScoresFault::SameHeadTwice(i, j)),
    ]
}

/// Whether keys `(l, h)` form a full grid, each once.
pub(super) fn full_grid(keys: &[(usize, usize)]) -> bool {
    let layers = keys.iter().map(|k| k.0).max().map_or(0, |m| m + 1);
    let heads = keys.iter().map(|k| k.1).max().map_or(0, |m| m + 1);
    let mut seen = std::collections::HashSet::new();
    layers * heads == keys.len() && keys.iter().all(|k| seen.insert(*k))
}

pub(super) fn head_scores_parse_json(b: &mut Battery) {
    b.run("HeadScores::parse_json", 12_000, (scores(), scores_fault()), |p, (s, fault)| {
        let mut entries = s.entries();
        let n = entries.len();
        let key_field = |k: &str| invalid(format!("head scores key {k:?}"));
        let (text, expect) = match fault {
            ScoresFault::None => (render_json(&entries), Expect::Ok),
            ScoresFault::Truncated(at) => {
                let text = render_json(&entries);
                (text[..at % text.len()].to_string(), invalid("head scores"))
            }
            ScoresFault::NotAnObject(t) => (t.to_string(), invalid("head scores")),
            ScoresFault::BadKey(i, k) => {
                entries[i % n].0 = k.to_string();
                (render_json(&entries), key_field(k))
            }
            ScoresFault::IndexBeyondGrid(l, h) => {
                // A new key past the grid (small ones just below or right of it): beyond the key
                // count it names itself (no full grid can reach it); inside, the grid must close.
                let (l, h) = match (l, h) {
                    (l, h) if l > 4 || h > 4 => (l, h),
                    (x, _) if x % 2 == 0 => (s.layers + x, 0),
                    (x, _) => (0, s.heads + x),
                };
                let key = format!("{l}-{h}");
                entries.push((key.clone(), "[0.5]".into()));
                let expect = if l > n || h > n {
                    key_field(&key)
                } else {
                    let keys: Vec<(usize, usize)> =
                        (0..n).map(|i| (i / s.heads, i % s.heads)).chain([(l, h)]).collect();
                    if full_grid(&keys) { Expect::Ok } else { invalid("head scores") }
                };
                (render_json(&entries), expect)
            }
            ScoresFault::BadValue(i, v) => {
                let key = entries[i % n].0.clone();
                entries[i % n].1 = v.to_string();
                (render_json(&entries), key_field(&key))
            }
            ScoresFault::Hole(i) => {
                entries.remove(i % n);
                let keys: Vec<(usize, usize)> =
                    (0..n).filter(|&k| k != i % n).map(|k| (k / s.heads, k % s.heads)).collect();
                // With one key fewer, a key at index >= the key count names itself (the first in
                // the object's sorted key order); otherwise the grid must close.
                let m = keys.len();
                let beyond =
                    keys.iter().filter(|k| k.0 >= m || k.1 >= m).map(|k| format!("{}-{}", k.0, k.1)).min();
                let expect = match beyond {
                    Some(k) => key_field(&k),
                    None if m > 0 && full_grid(&keys) => Expect::Ok,
                    None => invalid("head scores"),
                };
                (render_json(&entries), expect)
            }
            ScoresFault::SameHeadTwice(i, j) => {
                // "0l-h" names the same head as "l-h" under another key.
                let (i, j) = (i % n, j % n);
                if i == j {
                    return Ok(());
                }
                entries[j].0 = format!("0{}", entries[i].0);
                (render_json(&entries), invalid("head scores"))
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(parsed) = p.call(expect, || HeadScores::parse_json(&text))? {
            let finite = parsed.as_slice().iter().all(|x| x.is_finite());
            check(ok && finite && parsed.as_slice().len() == parsed.layers() * parsed.heads(), || {
                format!("{parsed:?} from {text}")
            })?;
        }
        Ok(())
    });
}

pub(super) fn head_scores_to_kv_heads(b: &mut Battery) {
    let s = HeadScores::parse_json(&render_json(
        &Scores { layers: 2, heads: 12, lists: vec![vec![0.5]; 24] }.entries(),
    ))
    .unwrap();
    let kv = prop_oneof![0usize..40, Just(usize::MAX), Just(0)];
    b.run("HeadScores::to_kv_heads", 3_000, kv, |p, kv| {
        let expect = if kv > 0 && 12 % kv == 0 { Expect::Ok } else { invalid("kv_heads") };
        if let Some(m) = p.call(expect, || s.to_kv_heads(kv))? {
            check(m.heads() == kv && m.layers() == 2, || format!("{m:?}"))?;
        }
        Ok(())
    });
}

pub(super) fn budget_uniform(b: &mut Battery) {
    let pair = prop_oneof![(any::<u32>(), any::<u32>()), (0u32..300, 0u32..300)];
    b.run("budget::uniform", 5_000, pair, |p, (capacity, window)| {
        let expect = if capacity > window { Expect::Ok } else { invalid("capacity") };
        if let Some(c) = p.call(expect, || budget::uniform(capacity, window))? {
            check(c == capacity, || format!("{c} != {capacity}"))?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
pub(super) enum PyramidFault {
    None,
    CapacityNotAboveWindow(u32),
    Layers(usize),
    BetaZero,
    PromptShorterThanWindow(u32),
}

pub(super) fn budget_pyramid(b: &mut Battery) {
    let valid = (0u32..200, 1u32..300, 2usize..64, 0u32..5000, 1u32..40)
        .prop_map(|(w, extra, layers, q, beta)| (w + extra, w, layers, w + q, beta));
    let huge = (0u32..16).prop_map(|x| (u32::MAX - x, x, 2, u32::MAX - x / 2, 1));
    let fault = prop_oneof![
        Just(PyramidFault::None),
        any::<u32>().prop_map(PyramidFault::CapacityNotAboveWindow),
        prop_oneof![0usize..2, Just(usize::MAX), budget::MAX_LAYERS + 1..usize::MAX, Just(1usize << 40)]
            .prop_map(PyramidFault::Layers),
        Just(PyramidFault::BetaZero),
        any::<u32>().prop_map(PyramidFault::PromptShorterThanWindow),
    ];
    b.run(
        "budget::pyramid",
        8_000,
        (prop_oneof![9 => valid, 1 => huge], fault),
        |p, ((mut c, mut w, mut layers, mut q, mut beta), fault)| {
            let expect = match fault {
                PyramidFault::None => Expect::Ok,
                PyramidFault::CapacityNotAboveWindow(x) => {
                    (c, w) = (w.saturating_sub(x % 3), w.max(1));
                    invalid("capacity")
                }
                PyramidFault::Layers(l) => {
                    layers = l;
                    invalid("layers")
                }
                PyramidFault::BetaZero => {
                    beta = 0;
                    invalid("beta")
                }
                PyramidFault::PromptShorterThanWindow(x) => {
                    (w, c) = (w.max(1), c.max(w.max(1) + 1));
                    q = x % w;
                    invalid("prompt_len")
                }
            };
            if let Some(v) = p.call(expect, || budget::pyramid(c, w, layers, q, beta))? {
                let bounded = v.iter().all(|&x| x >= w && x <= q.max(c));
                check(v.len() == layers && bounded, || format!("{v:?} for C={c} W={w} q={q}"))?;
            }
            Ok(())
        },
    );
}

#[derive(Clone, Debug)]
pub(super) enum HeadKvFault {
    None,
    Empty,
    BadScore(usize, f32),
    Beta(f32),
    Temp(f32),
    BaseNotAboveWindow(u32),
    AllZero,
    SumOverflows,
    TempUnderflows,
    WindowOverflows(u32),
    BaseTooLarge,
}

pub(super) fn budget_headkv(b: &mut Battery) {
    let fault = prop_oneof![
        Just(HeadKvFault::None),
        Just(HeadKvFault::Empty),
        (0usize..64, prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, -1e-30]))
            .prop_map(|(i, x)| HeadKvFault::BadScore(i, x)),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.999, 0.0, -1.5]).prop_map(HeadKvFault::Beta),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.0, -0.0, -2.0]).prop_map(HeadKvFault::Temp),
        (0u32..5).prop_map(HeadKvFault::BaseNotAboveWindow),
        Just(HeadKvFault::AllZero),
        Just(HeadKvFault::SumOverflows),
        Just(HeadKvFault::TempUnderflows),
        (0u32..4).prop_map(HeadKvFault::WindowOverflows),
        Just(HeadKvFault::BaseTooLarge),
    ];
    let importance = prop::collection::vec(0.0f32..10.0, 2..64);
    let opts = (1.0f32..4.0, 0.25f32..4.0, any::<bool>());
    b.run(
        "budget::headkv",
        8_000,
        (importance, 0u32..64, 1u32..2000, opts, fault),
        |p, (mut imp, mut w, base, (beta, temp, factory), fault)| {
            let mut base = base + w;
            let variant = if factory { HeadKvVariant::KvCacheFactory } else { HeadKvVariant::HeadKvRepo };
            let mut o = HeadKvOptions { beta, temp, variant };
            imp[0] += 0.5; // never all zero unless asked
            let expect = match fault {
                HeadKvFault::None => Expect::Ok,
                HeadKvFault::Empty => {
                    imp.clear();
                    invalid("importance")
                }
                HeadKvFault::BadScore(i, x) => {
                    let i = i % imp.len();
                    imp[i] = x;
                    invalid(format!("importance[{i}]"))
                }
                HeadKvFault::Beta(x) => {
                    o.beta = x;
                    invalid("beta")
                }
                HeadKvFault::Temp(x) => {
                    o.temp = x;
                    invalid("temp")
                }
                HeadKvFault::BaseNotAboveWindow(x) => {
                    o.variant = HeadKvVariant::HeadKvRepo;
                    base = w.saturating_sub(x);
                    invalid("base_capacity")
                }
                HeadKvFault::AllZero => {
                    imp.iter_mut().for_each(|x| *x = 0.0);
                    invalid("importance")
                }
                HeadKvFault::SumOverflows => {
                    imp.iter_mut().for_each(|x| *x = f32::MAX);
                    invalid("importance")
                }
                HeadKvFault::TempUnderflows => {
                    // Equal scores of 1/n each, raised to a huge power, all become 0.
                    imp.iter_mut().for_each(|x| *x = 1.0);
                    o.variant = HeadKvVariant::HeadKvRepo;
                    o.temp = 1e30;
                    invalid("temp")
                }
                HeadKvFault::WindowOverflows(x) => {
                    // The factory variant does not subtract the window: caps of at least
                    // base - base / beta >= 4 rows plus a window near u32::MAX overflow.
                    (o.variant, o.beta, base, w) = (HeadKvVariant::KvCacheFactory, 1.5, 12, u32::MAX - x);
                    invalid("window")
                }
                HeadKvFault::BaseTooLarge => {
                    (o.variant, base, w) = (HeadKvVariant::HeadKvRepo, u32::MAX, 1);
                    invalid("base_capacity")
                }
            };
            if let Some(v) = p.call(expect, || budget::headkv(&imp, base, w, &o))? {
                check(v.len() == imp.len() && v.iter().all(|&x| x >= w), || format!("{v:?}"))?;
            }
            Ok(())
        },
    );
}
