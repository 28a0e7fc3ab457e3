//! One layer's prompt as the prefill kernels read it ([`Prompt`], [`Packing`]) and its validated
//! geometry, shared by [`select`](crate::select) and [`scores`](crate::scores). The device-side
//! addressing is `cuda/prompt.cuh`; [`Geometry`] is its host mirror.

use crate::dtype::{KvElem, check_head_dim};
use crate::error::{Error, Result};
use crate::layout::MAX_ROWS;
use crate::params::HwPromptShape;
use crate::store::Store;

/// Largest supported GQA group size (query heads per KV head).
pub const MAX_GROUP: usize = 16;

/// How a [`Prompt`]'s rows are laid out.
///
/// Two packed sequences of 6 and 4 tokens, compressed in one call (KNorm scores, so no queries;
/// equal keys tie, and ties keep the lower positions):
///
/// ```
/// # fn main() -> headwise::Result<()> {
/// use headwise::select::{self, Budgets, Packing, Prompt, Score, SelectOptions, SelectWorkspace};
/// use headwise::{EmuStore, Store};
/// use half::bf16;
/// let (d, cu) = (64, [0u32, 6, 10]);
/// // [total = 10 tokens][kv_heads = 1][d], token-major.
/// let k = EmuStore.upload(&vec![bf16::ONE; 10 * d])?;
/// let none = EmuStore.zeros::<bf16>(0)?;
/// let prompt = Prompt {
///     k: &k, v: &k, queries: &none, batch: 2, kv_heads: 1, group_size: 1,
///     q_len: 6, // the longest sequence
///     head_dim: d, packing: Packing::Varlen { cu_seqlens: &cu },
/// };
/// let opts = SelectOptions { window: 2, pool_kernel: 1, score: Score::KeyNorm, ..SelectOptions::default() };
/// let mut ws = SelectWorkspace::new();
/// let cache = select::compress(&EmuStore, &prompt, Budgets::PerRow(&[3, 3]), &opts, &mut ws)?;
/// // Positions within each sequence: the best prefix token, then the window.
/// assert_eq!(ws.kept(&EmuStore)?, vec![vec![0, 4, 5], vec![0, 2, 3]]);
/// assert_eq!(cache.layout().segments()[1].len, 3);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Packing<'a> {
    /// Head-major, every sequence `q_len` tokens: `k`/`v` are `[batch][kv_heads][q_len]
    /// [head_dim]`, `queries` only the window's, `[batch][kv_heads * G][window][head_dim]`.
    #[default]
    HeadMajor,
    /// Token-major and packed, as flash-attn's varlen and FlashInfer's ragged tensors, each
    /// sequence its own length: sequence `b` is tokens `cu_seqlens[b] .. cu_seqlens[b + 1]`
    /// (host memory, `batch + 1` entries, the first 0, non-decreasing, every length at least
    /// the window), `k`/`v` are `[total][kv_heads][head_dim]` and `queries` the engine's whole
    /// `[total][kv_heads * G][head_dim]` (only the last `window` of each sequence are read).
    /// `Prompt::q_len` is then the longest length (flash-attn's `max_seqlen`). The call uploads
    /// the `batch + 1` offsets to the store (the kernels index with them).
    Varlen {
        /// Offsets of the sequences in the packed token order, `batch + 1` of them.
        cu_seqlens: &'a [u32],
    },
}

/// One layer's prompt: keys, values and the queries that score them (see [`Packing`] for the
/// two forms; query head `h * G + g` belongs to KV head `h`).
pub struct Prompt<'a, S: Store, T: KvElem> {
    /// Keys (already RoPE-rotated), `[batch][kv_heads][q_len][head_dim]` head-major.
    pub k: &'a S::Buf<T>,
    /// Values, same shape as `k`.
    pub v: &'a S::Buf<T>,
    /// Last `window` queries per query head, `[batch][kv_heads * group_size][window][head_dim]`
    /// head-major. Not read by query-agnostic scores (may be empty then).
    pub queries: &'a S::Buf<T>,
    /// Sequences.
    pub batch: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Query heads per KV head (1..=16).
    pub group_size: usize,
    /// Prompt tokens per sequence (head-major), or the longest sequence's ([`Packing::Varlen`]).
    pub q_len: usize,
    /// Elements per K/V row (64, 128 or 256).
    pub head_dim: usize,
    /// Which form `k`, `v` and `queries` have.
    pub packing: Packing<'a>,
}

/// A prompt's validated shape for one window: per-sequence lengths and the form, with the host
/// mirror of `cuda/prompt.cuh`'s addressing.
pub(crate) struct Geometry {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub window: usize,
    /// The longest sequence (every sequence's, head-major).
    pub max_len: usize,
    pub token_major: bool,
    /// Packed only: the offsets (`batch + 1`), as given and as the kernels read them. Head-major
    /// keeps nothing per sequence (a huge `batch` is refused by its bounds, not by an
    /// allocation).
    starts: Option<Vec<usize>>,
    cu: Option<Vec<i32>>,
}

impl Geometry {
    /// Validates the prompt's shape and the K/V lengths for `window`, with `per_seg` buffer rows
    /// per (sequence, KV head) (1, or G per query head); errors name the [`Prompt`] field.
    /// Every product the kernels form is bounded by int32 rows.
    pub fn new<S: Store, T: KvElem>(p: &Prompt<'_, S, T>, window: usize, per_seg: usize) -> Result<Geometry> {
        check_head_dim(p.head_dim)?;
        if p.batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        if p.kv_heads == 0 {
            return Err(Error::invalid("kv_heads", "must be at least 1"));
        }
        if p.group_size == 0 || p.group_size > MAX_GROUP {
            return Err(Error::invalid("group_size", format!("{} is outside 1..={MAX_GROUP}", p.group_size)));
        }
        if p.q_len == 0 {
            return Err(Error::invalid("q_len", "must be at least 1"));
        }
        if window == 0 || window > p.q_len {
            return Err(Error::invalid("window", format!("{window} is outside 1..=q_len {}", p.q_len)));
        }
        let bound = |x: Option<usize>| x.filter(|&v| v as u64 <= MAX_ROWS);
        // Segments and buffer rows first: they bound batch before anything per sequence.
        let segments = p.batch.checked_mul(p.kv_heads);
        let (Some(segments), Some(rows)) =
            (bound(segments), bound(segments.and_then(|s| s.checked_mul(per_seg))))
        else {
            return Err(Error::invalid("batch", format!("batch * kv_heads * G exceeds {MAX_ROWS}")));
        };
        let (starts, total) = match p.packing {
            Packing::HeadMajor => (None, 0),
            Packing::Varlen { cu_seqlens } => {
                if cu_seqlens.len() != p.batch + 1 {
                    return Err(Error::invalid(
                        "cu_seqlens",
                        format!("{} entries, expected batch + 1 = {}", cu_seqlens.len(), p.batch + 1),
                    ));
                }
                if cu_seqlens[0] != 0 {
                    return Err(Error::invalid("cu_seqlens[0]", format!("{} must be 0", cu_seqlens[0])));
                }
                let mut longest = 0;
                for b in 0..p.batch {
                    let (lo, hi) = (cu_seqlens[b], cu_seqlens[b + 1]);
                    if hi < lo {
                        return Err(Error::invalid(
                            format!("cu_seqlens[{}]", b + 1),
                            format!("{hi} is below cu_seqlens[{b}] = {lo}"),
                        ));
                    }
                    longest = longest.max((hi - lo) as usize);
                }
                if longest != p.q_len {
                    return Err(Error::invalid(
                        "q_len",
                        format!("{} differs from the longest sequence in cu_seqlens, {longest}", p.q_len),
                    ));
                }
                for b in 0..p.batch {
                    let len = (cu_seqlens[b + 1] - cu_seqlens[b]) as usize;
                    if len < window {
                        return Err(Error::invalid(
                            format!("cu_seqlens[{}]", b + 1),
                            format!("sequence {b} has {len} tokens, fewer than the window {window}"),
                        ));
                    }
                }
                (
                    Some(cu_seqlens.iter().map(|&c| c as usize).collect::<Vec<_>>()),
                    cu_seqlens[p.batch] as usize,
                )
            }
        };
        let token_major = starts.is_some();
        // One entry per token per row (kept positions; head-major also the K/V rows), then the
        // query rows, each within int32 rows.
        let entries =
            if token_major { total.checked_mul(p.kv_heads * per_seg) } else { rows.checked_mul(p.q_len) };
        if bound(entries).is_none() {
            return Err(Error::invalid(
                "q_len",
                format!("score rows {rows} * q_len {} exceeds {MAX_ROWS} rows", p.q_len),
            ));
        }
        let query_rows = if token_major {
            total.checked_mul(p.kv_heads * p.group_size)
        } else {
            segments.checked_mul(p.group_size * window)
        };
        if bound(query_rows).is_none() {
            let field = if token_major { "q_len" } else { "window" };
            return Err(Error::invalid(field, format!("query rows exceed {MAX_ROWS}")));
        }
        let cu = starts.as_ref().map(|s| s.iter().map(|&c| c as i32).collect());
        let g = Geometry {
            batch: p.batch,
            kv_heads: p.kv_heads,
            group: p.group_size,
            head_dim: p.head_dim,
            window,
            max_len: p.q_len,
            token_major,
            starts,
            cu,
        };
        let kv = g.total() * p.kv_heads * p.head_dim;
        for (field, len) in [("k", S::len(p.k)), ("v", S::len(p.v))] {
            if len != kv {
                let what = if token_major { "total tokens" } else { "batch * q_len" };
                return Err(Error::invalid(
                    field,
                    format!("{len} elements, expected {what} * kv_heads * head_dim = {kv}"),
                ));
            }
        }
        Ok(g)
    }

    /// First token of sequence `b` in the packed order.
    pub fn start(&self, b: usize) -> usize {
        match &self.starts {
            Some(s) => s[b],
            None => b * self.max_len,
        }
    }

    /// Tokens of sequence `b`.
    pub fn len(&self, b: usize) -> usize {
        match &self.starts {
            Some(s) => s[b + 1] - s[b],
            None => self.max_len,
        }
    }

    /// The shortest sequence.
    pub fn min_len(&self) -> usize {
        match &self.starts {
            Some(s) => s.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0),
            None => self.max_len,
        }
    }

    pub fn segments(&self) -> usize {
        self.batch * self.kv_heads
    }

    pub fn total(&self) -> usize {
        self.start(self.batch)
    }

    /// Elements `queries` must hold when they are read, and what they count.
    pub fn queries_len(&self) -> (usize, &'static str) {
        let rows = self.kv_heads * self.group * self.head_dim;
        if self.token_major {
            (self.total() * rows, "total tokens * kv_heads * group_size * head_dim")
        } else {
            (self.batch * rows * self.window, "batch * kv_heads * group_size * window * head_dim")
        }
    }

    /// K/V row of token `t` of segment `s` (`PromptSeg::key_row`).
    pub fn key_row(&self, s: usize, t: usize) -> usize {
        let (b, h) = (s / self.kv_heads, s % self.kv_heads);
        let start = self.start(b);
        if self.token_major {
            (start + t) * self.kv_heads + h
        } else {
            start * self.kv_heads + h * self.len(b) + t
        }
    }

    /// Tokens of score row `row` when each segment has `per_seg` rows.
    pub fn row_len(&self, row: usize, per_seg: usize) -> usize {
        self.len(row / (self.kv_heads * per_seg))
    }

    /// Start of row `row` in a buffer of one entry per token (`all`) or per prefix token
    /// (`prefix`) per row (`RowSpan`).
    pub fn row_span(&self, row: usize, per_seg: usize) -> (usize, usize) {
        let rps = self.kv_heads * per_seg;
        let b = row / rps;
        let j = row - b * rps;
        let (start, len) = (self.start(b), self.len(b));
        (start * rps + j * len, (start - b * self.window) * rps + j * (len - self.window))
    }

    /// Entries of a buffer with one per token per row (`per_seg` rows per segment).
    pub fn all_entries(&self, per_seg: usize) -> usize {
        self.total() * self.kv_heads * per_seg
    }

    /// Entries of a buffer with one per prefix token per row.
    pub fn prefix_entries(&self, per_seg: usize) -> usize {
        (self.total() - self.batch * self.window) * self.kv_heads * per_seg
    }

    /// The longest prefix.
    pub fn max_prefix(&self) -> usize {
        self.max_len - self.window
    }

    /// The kernels' view, with the uploaded offsets (`Varlen`) or none.
    pub fn params(&self, cu: *const i32) -> HwPromptShape {
        HwPromptShape {
            cu_seqlens: if self.cu.is_some() { cu } else { std::ptr::null() },
            batch: self.batch as i32,
            kv_heads: self.kv_heads as i32,
            group_size: self.group as i32,
            q_len: self.max_len as i32,
            window: self.window as i32,
            token_major: i32::from(self.token_major),
        }
    }

    /// Uploads the offsets into `buf` when the kernels need them (`Varlen`); `buf` is left as it
    /// is otherwise.
    pub fn upload<S: Store>(&self, store: &S, buf: &mut Option<S::Buf<i32>>) -> Result<()> {
        if let Some(cu) = &self.cu {
            match buf {
                Some(b) if S::len(b) == cu.len() => store.overwrite(b, cu)?,
                _ => *buf = Some(store.upload(cu)?),
            }
        }
        Ok(())
    }
}
