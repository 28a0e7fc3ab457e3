//! The kernel launches of prefill compression (cuda/select.cu): the shared parameter block, the
//! scoring passes through the selection (statistics, scores or KNorm or the caller's, pooling,
//! AdaKV or threshold counts, top-k) and the gather of the kept rows. Validation and the public
//! entry points are in the parent module; everything here runs on checked shapes.

use super::*;

pub(super) fn base_params(
    shape: &Shape,
    opts: &SelectOptions,
    chunk: usize,
    cu: *const i32,
) -> Result<HwSelectParams> {
    let scale = opts.scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !(scale * std::f32::consts::LOG2_E).is_finite() || scale == 0.0 {
        return Err(Error::invalid(
            "scale",
            format!("{scale} must be nonzero with |scale| * log2(e) finite"),
        ));
    }
    let null = std::ptr::null_mut();
    Ok(HwSelectParams {
        k: null,
        v: null,
        queries: null,
        stats: null as *mut f32,
        final_stats: null as *mut f32,
        scores: null as *mut f32,
        keys: null as *mut u32,
        budgets: null as *mut i32,
        kept: null as *mut i32,
        k_cache: null,
        v_cache: null,
        seg: HwSegmentTable {
            offset: std::ptr::null(),
            capacity: std::ptr::null(),
            len: null as *mut i32,
            sink: std::ptr::null(),
            ring_head: null as *mut i32,
            mode: std::ptr::null(),
            num_segments: 0,
        },
        prompt: shape.geo.params(cu),
        num_segments: shape.segments as i32,
        head_dim: shape.head_dim as i32,
        pool_kernel: opts.pool_kernel as i32,
        pool_mode: match opts.pool {
            Pool::Max => HW_POOL_MAX,
            Pool::Avg => HW_POOL_AVG,
        } as i32,
        gqa_mode: match opts.gqa {
            GqaReduce::Mean => HW_GQA_MEAN,
            GqaReduce::Max => HW_GQA_MAX,
        } as i32,
        per_query_head: (opts.granularity == Granularity::QueryHead) as i32,
        chunk_tokens: chunk as i32,
        splits: shape.q.div_ceil(chunk) as i32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        rows_per_sequence: shape.rows_per_sequence as i32,
        adakv_prefix_budget: 0,
        adakv_floor: 0,
        adakv_keep: 1.0,
        sink: shape.sink as i32,
        threshold_key: 0,
    })
}

/// Runs every pass up to the selection; returns the kept count per row.
#[allow(clippy::too_many_arguments)]
pub(super) fn score_and_select<S: Store, T: KvElem>(
    store: &S,
    prompt: &Prompt<'_, S, T>,
    given: Option<&S::Buf<f32>>,
    shape: &Shape,
    budgets: &Budgets<'_>,
    known: Option<&[u32]>,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
) -> Result<Vec<u32>> {
    let chunk = plan_chunk(shape, store.sm_count(), opts.chunk_tokens)?;
    let mut params = base_params(shape, opts, chunk, std::ptr::null())?;
    let rows = shape.rows;
    // Entries of the per-row buffers: one per prefix token (scores, keys) or per token (kept)
    // of each row's sequence.
    let (n, all) = (shape.geo.prefix_entries(shape.per_seg), shape.geo.all_entries(shape.per_seg));
    let max_n = shape.geo.max_prefix();
    let qrows = shape.segments * shape.group * shape.window;
    ensure(store, &mut ws.stats, qrows * params.splits as usize * 2)?;
    ensure(store, &mut ws.final_stats, qrows * 2)?;
    ensure(store, &mut ws.scores, n)?;
    ensure(store, &mut ws.keys, n)?;
    ensure(store, &mut ws.kept, all)?;
    shape.geo.upload(store, &mut ws.cu_seqlens)?;
    ws.last = None;
    let budget_buf = match known {
        Some(b) => {
            let b: Vec<i32> = b.iter().map(|&x| x.min(i32::MAX as u32) as i32).collect();
            store.upload(&b)?
        }
        None => store.zeros(rows)?,
    };
    ws.budgets = Some(budget_buf);
    if let Budgets::Threshold(t) = *budgets {
        params.threshold_key = order_key(t);
    }
    if let Budgets::AdaKv { base, floor_alpha } = *budgets {
        let bp = base as usize - shape.window;
        params.adakv_prefix_budget = bp as i32;
        // As the authors' torch code: floor(alpha * Bp) on Python floats, the (1 - alpha) factor
        // as an f32 tensor scalar.
        params.adakv_floor = (f64::from(floor_alpha) * bp as f64).floor() as i32;
        params.adakv_keep = (1.0 - f64::from(floor_alpha)) as f32;
    }

    let dt = T::DTYPE.name();
    let d = shape.head_dim;
    let stats_k = lookup(&format!("hw_select_stats_{dt}_d{d}"), "head_dim")?;
    let score_k = lookup(&format!("hw_select_score_{dt}_d{d}"), "head_dim")?;
    let merge_k = lookup("hw_select_stats_merge", "kernel")?;
    let pool_k = lookup("hw_select_pool", "kernel")?;
    let adakv_k = lookup("hw_select_adakv", "kernel")?;
    let threshold_k = lookup("hw_select_threshold", "kernel")?;
    let topk_k = lookup("hw_select_topk", "kernel")?;
    let knorm_k = lookup(&format!("hw_select_knorm_{dt}_d{d}"), "head_dim")?;
    if let Some(g) = given
        && S::len(g) != n
    {
        return Err(Error::invalid(
            "scores",
            format!(
                "{} elements, expected {n}: one per prefix token (q_len - window) of each of the {rows} rows",
                S::len(g)
            ),
        ));
    }
    let snapkv = given.is_none() && opts.score == Score::SnapKv;
    {
        let mut pins = S::Pins::default();
        params.k = store.addr("k", prompt.k, &mut pins)? as *const _;
        params.v = store.addr("v", prompt.v, &mut pins)? as *const _;
        if snapkv {
            params.queries = store.addr("queries", prompt.queries, &mut pins)? as *const _;
            check_aligned("queries", params.queries as u64)?;
        }
        params.stats = store.addr_mut("stats", ws.stats.as_mut().expect("ensured"), &mut pins)? as *mut f32;
        params.final_stats =
            store.addr_mut("final_stats", ws.final_stats.as_mut().expect("ensured"), &mut pins)? as *mut f32;
        params.scores = match given {
            // Read only: pool is the first kernel to touch them.
            Some(g) => store.addr("scores", g, &mut pins)? as *mut f32,
            None => store.addr_mut("scores", ws.scores.as_mut().expect("ensured"), &mut pins)? as *mut f32,
        };
        params.keys = store.addr_mut("keys", ws.keys.as_mut().expect("ensured"), &mut pins)? as *mut u32;
        params.budgets = store.addr_mut("budgets", ws.budgets.as_mut().expect("set"), &mut pins)? as *mut i32;
        params.kept = store.addr_mut("kept", ws.kept.as_mut().expect("ensured"), &mut pins)? as *mut i32;
        if let Some(cu) = &ws.cu_seqlens {
            params.prompt = shape.geo.params(store.addr("cu_seqlens", cu, &mut pins)? as *const i32);
        }
        check_aligned("k", params.k as u64)?;
        check_aligned("v", params.v as u64)?;

        let tiles = HwLaunch { grid_y: params.splits as u32, ..launch_1d(shape.segments, TILE_THREADS, 0) };
        // SAFETY (all launches below): every address comes from this store, pinned until the
        // end of this block. check_prompt validated the prompt buffers' lengths against the
        // sequences' lengths (cu_seqlens non-decreasing from 0, each length >= W, the longest
        // = q_len, uploaded as checked), G, W and head_dim, and bounded every product by int32
        // rows; the workspace buffers were sized above from the same geometry (stats: query rows
        // * splits over the longest sequence, scores and keys: each row's prefix, kept: each
        // row's tokens, budgets: rows). Budgets are >= window (checked on the host, or written
        // by the adakv kernel as count + window), so the selection writes min(budget, len) <=
        // len positions per row.
        if snapkv {
            unsafe { store.launch(stats_k, &tiles, &params)? };
            let merge = launch_1d(qrows.div_ceil(ELEMENTWISE_THREADS as usize), ELEMENTWISE_THREADS, 0);
            unsafe { store.launch(merge_k, &merge, &params)? };
        }
        if max_n > 0 {
            if snapkv {
                unsafe { store.launch(score_k, &tiles, &params)? };
            } else if given.is_none() {
                // One warp per (row, prefix token); the given scores (len rows * n, checked)
                // need no scoring kernel.
                let warps = (TILE_THREADS / 32) as usize;
                let y = max_n.div_ceil(warps).clamp(1, 65535) as u32;
                let cfg = HwLaunch { grid_y: y, ..launch_1d(rows, TILE_THREADS, 0) };
                unsafe { store.launch(knorm_k, &cfg, &params)? };
            }
            // Block x = row, blocks y stride over its prefix.
            let y = max_n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, 65535) as u32;
            let pool = HwLaunch { grid_y: y, ..launch_1d(rows, ELEMENTWISE_THREADS, 0) };
            unsafe { store.launch(pool_k, &pool, &params)? };
        }
        match budgets {
            Budgets::PerRow(_) => {}
            Budgets::AdaKv { .. } => unsafe {
                store.launch(adakv_k, &launch_1d(prompt.batch, TOP_THREADS, 0), &params)?
            },
            Budgets::Threshold(_) => unsafe {
                store.launch(threshold_k, &launch_1d(rows, TOP_THREADS, 0), &params)?
            },
        }
        unsafe { store.launch(topk_k, &launch_1d(rows, TOP_THREADS, 0), &params)? };
        drop(pins);
    }
    ws.last = Some(LastCall {
        all: (0..rows).map(|r| shape.geo.row_span(r, shape.per_seg).0).collect(),
        lens: (0..rows).map(|r| shape.row_len(r)).collect(),
        window: shape.window,
    });
    let counts: Vec<u32> = match known {
        Some(b) => b.iter().enumerate().map(|(r, &x)| (x as usize).min(shape.row_len(r)) as u32).collect(),
        None => store
            .download(ws.budgets.as_ref().expect("set"))?
            .iter()
            .enumerate()
            .map(|(r, &x)| (x.max(0) as usize).min(shape.row_len(r)) as u32)
            .collect(),
    };
    Ok(counts)
}

/// Copies the kept rows of the last selection in `ws` into `dest` (its layout already holds the
/// counts as segment lengths).
pub(super) fn gather<S: Store, T: KvElem>(
    prompt: &Prompt<'_, S, T>,
    shape: &Shape,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
    dest: &mut LayerCache<S, T>,
) -> Result<()> {
    let max_len = dest.layout().segments().iter().map(|s| s.len as usize).max().unwrap_or(0);
    if max_len == 0 {
        return Ok(());
    }
    let mut params = base_params(shape, opts, shape.q, std::ptr::null())?;
    let kernel = lookup(&format!("hw_select_gather_d{}", shape.head_dim), "head_dim")?;
    let rows = dest.layout().segments().len();
    let (store, k_cache, v_cache, table) = dest.parts_mut();
    let mut pins = S::Pins::default();
    params.k = store.addr("k", prompt.k, &mut pins)? as *const _;
    params.v = store.addr("v", prompt.v, &mut pins)? as *const _;
    params.kept =
        store.addr_mut("kept", ws.kept.as_mut().expect("set by score_and_select"), &mut pins)? as *mut i32;
    if let Some(cu) = &ws.cu_seqlens {
        params.prompt = shape.geo.params(store.addr("cu_seqlens", cu, &mut pins)? as *const i32);
    }
    params.k_cache = store.addr_mut("k_cache", k_cache, &mut pins)? as *mut _;
    params.v_cache = store.addr_mut("v_cache", v_cache, &mut pins)? as *mut _;
    params.seg = DeviceTable::params(store.addr_mut("device_table", table, &mut pins)?, rows);
    let y = max_len.div_ceil(GATHER_ROWS_PER_BLOCK).min(65535) as u32;
    let cfg = HwLaunch { grid_y: y, ..launch_1d(rows, TILE_THREADS, 0) };
    // SAFETY: addresses from this store, pinned. Row r of segment s reads kept[s][r] (r < len <=
    // the sequence's length, written by the topk kernel of the same shape: positions below that
    // length of source segment s or s / G, inside the validated prompt) and writes row r of a
    // validated Full segment with len <= capacity.
    unsafe { store.launch(kernel, &cfg, &params)? };
    drop(pins);
    Ok(())
}
