//! The C-API fuzz driver, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/c_api.rs`, nightly, sanitizers) and a stable test
//! (`ffi/capi/tests/fuzz_driver.rs`, CI) that feeds it random bytes and
//! replays `fuzz/regressions/`.
//!
//! The input decodes (with `arbitrary`) into a sequence of calls on the
//! exported `kfac_*` functions: configurations with arbitrary fields, layers
//! of small or overflowing sizes, observations with arbitrary leading
//! dimensions, NULL pointers, NaN/Inf data and out-of-range token ids,
//! steps with aliased, missing or mismatched gradient buffers, corrupted
//! checkpoints, caller collectives that fail, freed handles, and
//! `struct_size` edge cases of `KfacConfig` and `KfacCollectives` (too
//! small, larger with zero or non-zero extra bytes, garbage).
//!
//! The driver keeps the caller's side of the contract: every pointer it
//! passes is NULL, a handle the library gave out (possibly freed), or a
//! buffer at least as large as the documented size for the shape it
//! claims. Anything the library then does wrong — a panic escaping, an
//! out-of-bounds access (ASan), a hang, an abort — is the library's bug.
//! A returned error status is fine; after one, the handles must keep
//! working.

use std::ffi::{c_void, CString};
use std::ptr;

use arbitrary::{Arbitrary, Unstructured};
use kfac_capi::*;

/// A dimension: mostly small (0..24), sometimes one that overflows size
/// arithmetic or could never be allocated.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Dim(u8);

impl Dim {
    fn get(self) -> usize {
        match self.0 {
            0..=239 => (self.0 % 24) as usize,
            240..=243 => usize::MAX,
            244..=247 => usize::MAX / 2 + 1,
            248..=251 => 1 << 31,
            _ => 1 << 40,
        }
    }
}

/// Float data: finite values with an optional NaN/Inf planted.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Fill {
    seed: u32,
    poison: Option<(u8, Poison)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Poison {
    Nan,
    Inf,
    Big,
}

impl Fill {
    fn make(self, len: usize) -> Vec<f32> {
        let mut s = self.seed as u64 | 1;
        let mut v: Vec<f32> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        if let (Some((at, p)), false) = (self.poison.filter(|(at, _)| at % 8 == 0), v.is_empty()) {
            let i = at as usize % v.len();
            v[i] = match p {
                Poison::Nan => f32::NAN,
                Poison::Inf => f32::NEG_INFINITY,
                Poison::Big => 3.0e38,
            };
        }
        v
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzConfig {
    damping: f64,
    factor_decay: f64,
    kl_clip: f64,
    lr: f64,
    factor_update_steps: u8,
    inv_update_steps: u8,
    method: u32,
    eigen_f64: u32,
    precompute_denominators: u32,
    kfac_pytorch_compat: u32,
    grad_worker_fraction: f64,
    wire: u32,
    /// Use the defaults for most fields (so that runs get past creation).
    mostly_default: bool,
    /// `struct_size` of the config (`None`: `sizeof(KfacConfig)`).
    size: Option<StructSize>,
}

/// A `struct_size` edge case.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum StructSize {
    /// Smaller than the struct (refused).
    Short(u8),
    /// Larger by 1..=TAIL bytes, all zero (accepted) or one of them set
    /// (refused).
    Longer { extra: u8, poke: Option<u8> },
    /// Beyond `KFAC_MAX_STRUCT_SIZE` (refused before anything past
    /// `struct_size` is read).
    Garbage(u8),
}

/// Extra bytes after an extensible struct, for `struct_size`s larger than
/// it (a caller built against a newer header).
const TAIL: usize = 64;

/// An extensible struct followed by `TAIL` bytes (`tail` starts exactly at
/// `size_of::<T>()`: `T`'s size is a multiple of its alignment).
#[repr(C)]
struct WithTail<T> {
    v: T,
    tail: [u8; TAIL],
}

impl StructSize {
    /// The `struct_size` for a struct of `cur` bytes whose earlier
    /// released layouts have the sizes `older`, whether the library must
    /// accept it, and the index of a tail byte to set non-zero.
    fn value(self, cur: usize, older: &[usize]) -> (usize, bool, Option<usize>) {
        match self {
            StructSize::Short(k) => {
                let n = cur - 1 - k as usize % cur;
                (n, older.contains(&n), None)
            }
            StructSize::Longer { extra, poke } => {
                let e = 1 + extra as usize % TAIL;
                let at = poke.map(|i| i as usize % e);
                (cur + e, at.is_none(), at)
            }
            StructSize::Garbage(k) if k % 2 == 0 => (usize::MAX, false, None),
            StructSize::Garbage(k) => (KFAC_MAX_STRUCT_SIZE + 1 + k as usize, false, None),
        }
    }
}

/// Checks `kfac_config_default` with `size` on a struct with a tail, then
/// returns a default config with `struct_size` (and the tail) set as
/// `size` says, and whether `kfac_precond_create` must accept it.
unsafe fn sized_config(size: Option<StructSize>) -> (Box<WithTail<KfacConfig>>, bool) {
    use std::mem::size_of;
    let cur = size_of::<KfacConfig>();
    // The layouts before `memory_budget` and before `refresh_tolerance`
    // (8 bytes appended each time).
    let older = [cur - 16, cur - 8];
    let (n, ok, poke) = size.map_or((cur, true, None), |s| s.value(cur, &older));
    // SAFETY: all-zero is a valid KfacConfig (integers and floats).
    let zero = unsafe { std::mem::zeroed::<KfacConfig>() };
    let mut w = Box::new(WithTail {
        v: zero,
        tail: [0xa5; TAIL],
    });
    // Fields an older layout does not have: must not be written then.
    w.v.memory_budget = u64::MAX;
    w.v.refresh_tolerance = -1.0;
    // The writer: the documented fields, zeros past them, or nothing.
    // SAFETY: `w` has `cur + TAIL` writable bytes, and `n` is at most that
    // unless it exceeds KFAC_MAX_STRUCT_SIZE (refused before any write).
    let st = unsafe { kfac_config_default(&mut w.v, n) };
    if older.contains(&n) {
        assert_eq!(st, KfacStatus::KFAC_OK);
        assert_eq!(w.v.struct_size, n);
        assert_eq!(
            w.v.refresh_tolerance, -1.0,
            "wrote past an older struct_size"
        );
        if n == cur - 16 {
            assert_eq!(
                w.v.memory_budget,
                u64::MAX,
                "wrote past an older struct_size"
            );
        }
        assert!(w.tail.iter().all(|&b| b == 0xa5), "wrote past struct_size");
    } else if n >= cur && n <= cur + TAIL {
        assert_eq!(st, KfacStatus::KFAC_OK);
        assert_eq!(w.v.struct_size, n);
        assert!(w.tail[..n - cur].iter().all(|&b| b == 0), "tail not zeroed");
        assert!(
            w.tail[n - cur..].iter().all(|&b| b == 0xa5),
            "wrote past struct_size"
        );
    } else {
        assert_eq!(st, KfacStatus::KFAC_ERR_INVALID_ARGUMENT);
        assert_eq!(w.v.struct_size, 0, "a refused struct_size was written");
    }
    // The reader's input.
    // SAFETY: as above, with the size of the struct itself.
    let st = unsafe { kfac_config_default(&mut w.v, cur) };
    assert_eq!(st, KfacStatus::KFAC_OK);
    w.tail = [0; TAIL];
    w.v.struct_size = n;
    if let Some(i) = poke {
        w.tail[i] = 1;
    }
    (w, ok)
}

#[derive(Arbitrary, Debug)]
enum CommKind {
    /// NULL: a private single-process communicator.
    Null,
    /// `kfac_comm_local`.
    Local,
    /// Caller collectives of `world_size` ranks that do nothing but may
    /// fail (a "rank" of a group whose peers are all identical), with the
    /// given `struct_size` (`None`: `sizeof(KfacCollectives)`); `bounded`:
    /// with a (never reached) `timeout_ms`, so the callbacks run on the
    /// communicator's own thread.
    Callbacks {
        world_size: u8,
        fail_after: u8,
        size: Option<StructSize>,
        bounded: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct GradSpec {
    /// Index into the registered layers (or any id when out of range).
    layer: u8,
    ld_extra: i8,
    null_weight: bool,
    /// Pass a bias pointer whether or not the layer has one (or none).
    bias: BiasChoice,
    /// Reuse the weight buffer of an earlier entry (aliasing).
    alias: Option<u8>,
    fill: Fill,
}

#[derive(Arbitrary, Debug)]
enum BiasChoice {
    AsLayer,
    Null,
    Present,
}

#[derive(Arbitrary, Debug)]
enum Call {
    Create {
        cfg: FuzzConfig,
        comm: CommKind,
    },
    Linear {
        inf: Dim,
        outf: Dim,
        bias: u32,
    },
    Conv {
        cin: Dim,
        cout: Dim,
        k: (u8, u8),
        stride: (u8, u8),
        pad: (u8, u8),
        dil: (u8, u8),
        bias: u32,
        layout: u32,
    },
    Embedding {
        num: Dim,
        dim: Dim,
    },
    ObserveLinear {
        layer: u8,
        n: u8,
        lda_extra: i8,
        ldg_extra: i8,
        null: u8,
        fill: Fill,
    },
    ObserveConv {
        layer: u8,
        n: u8,
        h: u8,
        w: u8,
        null: u8,
        fill: Fill,
    },
    ObserveEmbedding {
        layer: u8,
        tokens: Vec<u16>,
        ldg_extra: i8,
        fill: Fill,
    },
    Step {
        grads: Vec<GradSpec>,
        allreduce_only: bool,
        stats: bool,
    },
    Stats,
    SaveLoad {
        short_by: u8,
        flip: Option<(u16, u8)>,
        truncate: Option<u16>,
    },
    /// Frees the preconditioner when the value is >= 224 (so most runs
    /// keep one).
    Free(u8),
    /// A call and a double free with one of the handles freed so far.
    UseFreed(u8),
}

/// What the driver knows about a registered layer (to size buffers).
#[derive(Clone, Copy, Debug)]
enum Layer {
    Linear {
        inf: usize,
        outf: usize,
        bias: bool,
    },
    Conv {
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize),
        dil: (usize, usize),
        bias: bool,
    },
    Embedding {
        num: usize,
        dim: usize,
    },
}

impl Layer {
    fn weight_shape(&self) -> (usize, usize) {
        match *self {
            Layer::Linear { inf, outf, .. } => (outf, inf),
            Layer::Conv { cin, cout, k, .. } => (cout, cin * k.0 * k.1),
            Layer::Embedding { num, dim } => (num, dim),
        }
    }
    fn has_bias(&self) -> bool {
        matches!(
            self,
            Layer::Linear { bias: true, .. } | Layer::Conv { bias: true, .. }
        )
    }
}

/// State of one callback communicator (each has its own, kept alive until
/// the end of the run).
struct CallbackState {
    calls_left: u32,
    world: usize,
}

unsafe extern "C" fn cb_allreduce(
    user: *mut c_void,
    _buf: *mut c_void,
    _count: usize,
    _dtype: KfacDtype,
) -> i32 {
    // SAFETY: `user` is the driver's live `CallbackState`.
    unsafe { tick(user) }
}
unsafe extern "C" fn cb_broadcast(
    user: *mut c_void,
    _buf: *mut c_void,
    _bytes: usize,
    _root: u32,
) -> i32 {
    // SAFETY: as above.
    unsafe { tick(user) }
}
unsafe extern "C" fn cb_allgather(
    user: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    bytes: usize,
) -> i32 {
    // Every "rank" contributes what this one sends; `recv` holds
    // `world_size * bytes` bytes by the documented contract.
    // SAFETY: `user` is this communicator's live `CallbackState`.
    let ws = unsafe { (*(user as *const CallbackState)).world };
    for r in 0..ws {
        // SAFETY: `send` has `bytes` readable bytes and `recv` has
        // `ws * bytes` writable ones, as the header documents.
        unsafe {
            ptr::copy_nonoverlapping(send as *const u8, (recv as *mut u8).add(r * bytes), bytes)
        };
    }
    // SAFETY: as above.
    unsafe { tick(user) }
}
unsafe extern "C" fn cb_barrier(user: *mut c_void) -> i32 {
    // SAFETY: as above.
    unsafe { tick(user) }
}

unsafe fn tick(user: *mut c_void) -> i32 {
    // SAFETY: `user` points to the driver's `CallbackState`, which outlives
    // every preconditioner using it (freed last).
    let st = unsafe { &mut *(user as *mut CallbackState) };
    if st.calls_left == 0 {
        return -1;
    }
    st.calls_left -= 1;
    0
}

/// A leading dimension: `cols` plus 0..=3 of padding, or (rarely) one
/// short of a row.
fn ld(cols: usize, extra: i8) -> usize {
    if extra < -120 {
        cols.saturating_sub(1)
    } else {
        cols + extra.rem_euclid(4) as usize
    }
}

/// NULL for the pointers whose bit is set in `mask`, rarely.
fn maybe_null(v: *const f32, mask: u8, bit: u8) -> *const f32 {
    if mask >= 0xf0 && mask & bit != 0 {
        ptr::null()
    } else {
        v
    }
}

/// A buffer of `rows x cols` with leading dimension `ld`, large enough for
/// the library's documented reach whether or not `ld >= cols`.
fn matrix(rows: usize, cols: usize, ld: usize, fill: Fill) -> Vec<f32> {
    fill.make(rows * ld.max(cols) + cols)
}

const MAX_ELEMS: usize = 1 << 16;

/// Counts of calls and of successful calls by kind, for coverage checks.
#[derive(Default, Debug)]
pub struct Summary {
    /// Calls made.
    pub calls: usize,
    /// Successful observe calls.
    pub observed: usize,
    /// Successful steps.
    pub steps: usize,
    /// Successful checkpoint round trips.
    pub reloads: usize,
    /// Failed calls (any status but `KFAC_OK`).
    pub errors: usize,
    /// Uses and double frees of a freed preconditioner handle (refused).
    pub stale: usize,
}

/// Runs one fuzz input: up to 64 calls decoded from `data`, on a
/// preconditioner that starts with the default configuration.
pub fn run(data: &[u8]) -> Summary {
    let mut u = Unstructured::new(data);
    let mut sum = Summary::default();
    let mut cb_states: Vec<*mut CallbackState> = Vec::new();
    let mut p: *mut KfacPrecond = ptr::null_mut();
    let mut layers: Vec<Layer> = Vec::new();
    let mut freed: Vec<*mut KfacPrecond> = Vec::new();
    // SAFETY: see the module docs: the driver keeps the caller's contract.
    unsafe {
        let mut c = std::mem::zeroed::<KfacConfig>();
        assert_eq!(
            kfac_config_default(&mut c, std::mem::size_of::<KfacConfig>()),
            KfacStatus::KFAC_OK
        );
        c.threads = 1;
        c.inv_update_steps = 2;
        assert_eq!(
            kfac_precond_create(&c, ptr::null_mut(), &mut p),
            KfacStatus::KFAC_OK
        );
        while sum.calls < 64 && !u.is_empty() {
            let Ok(call) = Call::arbitrary(&mut u) else {
                break;
            };
            let kind = match call {
                Call::ObserveLinear { .. }
                | Call::ObserveConv { .. }
                | Call::ObserveEmbedding { .. } => 1,
                Call::Step {
                    allreduce_only: false,
                    ..
                } => 2,
                Call::SaveLoad { .. } => 3,
                _ => 0,
            };
            if matches!(call, Call::UseFreed(_)) && freed.iter().any(|q| !q.is_null()) {
                sum.stale += 1;
            }
            let st = one(call, &mut p, &mut layers, &mut freed, &mut cb_states);
            sum.calls += 1;
            assert_ne!(st, KfacStatus::KFAC_ERR_PANIC, "a panic inside the library");
            if st == KfacStatus::KFAC_OK {
                match kind {
                    1 => sum.observed += 1,
                    2 => sum.steps += 1,
                    3 => sum.reloads += 1,
                    _ => {}
                }
            } else {
                sum.errors += 1;
                // The message is a valid, non-empty C string.
                let msg = std::ffi::CStr::from_ptr(kfac_last_error());
                assert!(!msg.to_bytes().is_empty(), "{st:?} without a message");
            }
        }
        let _ = kfac_precond_free(p);
        for c in cb_states {
            drop(Box::from_raw(c));
        }
    }
    sum
}

unsafe fn one(
    call: Call,
    p: &mut *mut KfacPrecond,
    layers: &mut Vec<Layer>,
    freed: &mut Vec<*mut KfacPrecond>,
    cb_states: &mut Vec<*mut CallbackState>,
) -> KfacStatus {
    use KfacStatus::*;
    // Layer ids: mostly registered ones, sometimes one past the end.
    let n_layers = layers.len();
    let pick = |i: u8| (i as usize % (n_layers + 1)) as u32;
    let layer_at = |i: u8| layers.get(pick(i) as usize).copied();
    // SAFETY: the whole body keeps the contract described in the module
    // docs; each buffer is sized for the shape passed with it.
    unsafe {
        match call {
            Call::Create { cfg, comm } => {
                let (mut wide, size_ok) = sized_config(cfg.size);
                let c = &mut wide.v;
                c.threads = 1;
                if !cfg.mostly_default {
                    c.damping = cfg.damping;
                    c.factor_decay = cfg.factor_decay;
                    c.kl_clip = cfg.kl_clip;
                    c.lr = cfg.lr;
                    c.factor_update_steps = cfg.factor_update_steps as u64;
                    c.eigen_f64 = cfg.eigen_f64;
                    c.precompute_denominators = cfg.precompute_denominators;
                    c.kfac_pytorch_compat = cfg.kfac_pytorch_compat;
                    c.grad_worker_fraction = cfg.grad_worker_fraction;
                    c.wire = cfg.wire;
                }
                c.method = cfg.method % 3;
                c.inv_update_steps = cfg.inv_update_steps as u64;
                let comm_ptr = match comm {
                    CommKind::Null => ptr::null_mut(),
                    CommKind::Local => {
                        let mut h = ptr::null_mut();
                        assert_eq!(kfac_comm_local(&mut h), KFAC_OK);
                        h
                    }
                    CommKind::Callbacks {
                        world_size,
                        fail_after,
                        size,
                        bounded,
                    } => {
                        let ws = (world_size % 4) as u32;
                        let cb_state = Box::into_raw(Box::new(CallbackState {
                            calls_left: fail_after as u32,
                            world: ws as usize,
                        }));
                        cb_states.push(cb_state);
                        let cur = std::mem::size_of::<KfacCollectives>();
                        // The layout before `timeout_ms` is still accepted.
                        let older = [cur - std::mem::size_of::<u64>()];
                        let (n, ok, poke) =
                            size.map_or((cur, true, None), |s| s.value(cur, &older));
                        let mut coll = WithTail {
                            v: std::mem::zeroed::<KfacCollectives>(),
                            tail: [0; TAIL],
                        };
                        assert_eq!(kfac_collectives_init(&mut coll.v, cur), KFAC_OK);
                        assert_eq!(coll.v.struct_size, cur);
                        coll.v.struct_size = n;
                        if let Some(i) = poke {
                            coll.tail[i] = 1;
                        }
                        coll.v.user_data = cb_state as *mut c_void;
                        coll.v.rank = 0;
                        coll.v.world_size = ws;
                        coll.v.allreduce = Some(cb_allreduce);
                        coll.v.broadcast = Some(cb_broadcast);
                        coll.v.allgather = Some(cb_allgather);
                        coll.v.barrier = Some(cb_barrier);
                        if bounded {
                            coll.v.timeout_ms = 600_000;
                        }
                        let mut h = ptr::null_mut();
                        let st = kfac_comm_from_callbacks(&coll.v, &mut h);
                        if !ok {
                            assert_eq!(st, KFAC_ERR_INVALID_ARGUMENT, "struct_size {n}");
                        }
                        if st != KFAC_OK {
                            return st;
                        }
                        h
                    }
                };
                let mut q = ptr::null_mut();
                let st = kfac_precond_create(&wide.v, comm_ptr, &mut q);
                if !size_ok {
                    assert_eq!(st, KFAC_ERR_INVALID_ARGUMENT, "{:?}", cfg.size);
                }
                if st == KFAC_OK {
                    let _ = kfac_precond_free(*p);
                    freed.push(*p);
                    *p = q;
                    layers.clear();
                }
                // The preconditioner took over the connection (on success);
                // the handle itself stays the caller's to free.
                if !comm_ptr.is_null() {
                    assert_eq!(kfac_comm_free(comm_ptr), KFAC_OK);
                    // Its value is dead for good: a double free and a use
                    // are refused.
                    assert_eq!(kfac_comm_free(comm_ptr), KFAC_ERR_INVALID_HANDLE);
                    let (mut r, mut w) = (0u32, 0u32);
                    assert_eq!(
                        kfac_comm_rank(comm_ptr, &mut r, &mut w),
                        KFAC_ERR_INVALID_HANDLE
                    );
                }
                st
            }
            Call::Linear { inf, outf, bias } => {
                let name = CString::new(format!("l{}", layers.len())).unwrap();
                let mut id = 0;
                let st =
                    kfac_register_linear(*p, name.as_ptr(), inf.get(), outf.get(), bias, &mut id);
                if st == KFAC_OK {
                    assert_eq!(id as usize, layers.len());
                    layers.push(Layer::Linear {
                        inf: inf.get(),
                        outf: outf.get(),
                        bias: bias != 0,
                    });
                }
                st
            }
            Call::Conv {
                cin,
                cout,
                k,
                stride,
                pad,
                dil,
                bias,
                layout,
            } => {
                let name = CString::new(format!("l{}", layers.len())).unwrap();
                let mut id = 0;
                let s = |v: u8| (v % 5) as usize;
                let st = kfac_register_conv2d(
                    *p,
                    name.as_ptr(),
                    cin.get(),
                    cout.get(),
                    s(k.0),
                    s(k.1),
                    s(stride.0),
                    s(stride.1),
                    s(pad.0),
                    s(pad.1),
                    s(dil.0),
                    s(dil.1),
                    bias,
                    layout % 3,
                    &mut id,
                );
                if st == KFAC_OK {
                    layers.push(Layer::Conv {
                        cin: cin.get(),
                        cout: cout.get(),
                        k: (s(k.0), s(k.1)),
                        stride: (s(stride.0), s(stride.1)),
                        pad: (s(pad.0), s(pad.1)),
                        dil: (s(dil.0), s(dil.1)),
                        bias: bias != 0,
                    });
                }
                st
            }
            Call::Embedding { num, dim } => {
                let name = CString::new(format!("l{}", layers.len())).unwrap();
                let mut id = 0;
                let st = kfac_register_embedding(*p, name.as_ptr(), num.get(), dim.get(), &mut id);
                if st == KFAC_OK {
                    layers.push(Layer::Embedding {
                        num: num.get(),
                        dim: dim.get(),
                    });
                }
                st
            }
            Call::ObserveLinear {
                layer,
                n,
                lda_extra,
                ldg_extra,
                null,
                fill,
            } => {
                let n = (n % 17) as usize;
                let (inf, outf) = match layer_at(layer) {
                    Some(Layer::Linear { inf, outf, .. }) => (inf, outf),
                    // Not a linear layer: refused before any read.
                    _ => (1, 1),
                };
                if n * (inf + outf) > MAX_ELEMS {
                    return KFAC_OK;
                }
                let (lda, ldg) = (ld(inf, lda_extra), ld(outf, ldg_extra));
                let a = matrix(n, inf, lda, fill);
                let g = matrix(n, outf, ldg, fill);
                kfac_observe_linear(
                    *p,
                    pick(layer),
                    maybe_null(a.as_ptr(), null, 1),
                    n,
                    lda,
                    maybe_null(g.as_ptr(), null, 2),
                    ldg,
                )
            }
            Call::ObserveConv {
                layer,
                n,
                h,
                w,
                null,
                fill,
            } => {
                let (n, h, w) = ((n % 5) as usize, (h % 12) as usize, (w % 12) as usize);
                let (li, lo) = match layer_at(layer) {
                    Some(Layer::Conv {
                        cin,
                        cout,
                        k,
                        stride,
                        pad,
                        dil,
                        ..
                    }) => {
                        // The documented output size; any geometry where it
                        // does not exist is refused before a read, and a
                        // buffer of 1 is enough then.
                        let out = |x: usize, k: usize, s: usize, p: usize, d: usize| {
                            let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
                            (x + 2 * p).checked_sub(span).map(|v| v / s.max(1) + 1)
                        };
                        match (
                            out(h, k.0, stride.0, pad.0, dil.0),
                            out(w, k.1, stride.1, pad.1, dil.1),
                        ) {
                            (Some(oh), Some(ow)) => (n * cin * h * w, n * cout * oh * ow),
                            _ => (1, 1),
                        }
                    }
                    _ => (1, 1),
                };
                if li + lo > MAX_ELEMS {
                    return KFAC_OK;
                }
                let x = fill.make(li.max(1));
                let g = fill.make(lo.max(1));
                kfac_observe_conv2d(
                    *p,
                    pick(layer),
                    maybe_null(x.as_ptr(), null, 1),
                    maybe_null(g.as_ptr(), null, 2),
                    n,
                    h,
                    w,
                )
            }
            Call::ObserveEmbedding {
                layer,
                tokens,
                ldg_extra,
                fill,
            } => {
                let dim = match layer_at(layer) {
                    Some(Layer::Embedding { dim, .. }) => dim,
                    _ => 1,
                };
                let t: Vec<u64> = tokens.iter().take(32).map(|&v| v as u64 % 40).collect();
                let n = t.len();
                if n * dim > MAX_ELEMS {
                    return KFAC_OK;
                }
                let ldg = ld(dim, ldg_extra);
                let g = matrix(n, dim, ldg, fill);
                kfac_observe_embedding(*p, pick(layer), t.as_ptr(), n, g.as_ptr(), ldg)
            }
            Call::Step {
                grads,
                allreduce_only,
                stats,
            } => {
                let mut bufs: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
                let mut entries: Vec<KfacGrad> = Vec::new();
                for g in grads.iter().take(8) {
                    let (rows, cols, has_bias) = match layer_at(g.layer) {
                        Some(l) => {
                            let (r, c) = l.weight_shape();
                            (r, c, l.has_bias())
                        }
                        None => (1, 1, false),
                    };
                    if rows * cols > MAX_ELEMS {
                        return KFAC_OK;
                    }
                    let ldw = ld(cols, g.ld_extra);
                    let w = matrix(rows, cols, ldw, g.fill);
                    let b = g.fill.make(rows.max(1));
                    bufs.push((w, b));
                    let (w, b) = bufs.last_mut().unwrap();
                    let mut weight = w.as_mut_ptr();
                    if let Some(a) = g.alias {
                        if let Some(prev) = entries.get(a as usize) {
                            weight = prev.weight;
                        }
                    }
                    let bias_on = match g.bias {
                        BiasChoice::AsLayer => has_bias,
                        BiasChoice::Null => false,
                        BiasChoice::Present => true,
                    };
                    entries.push(KfacGrad {
                        layer: pick(g.layer),
                        weight: if g.null_weight {
                            ptr::null_mut()
                        } else {
                            weight
                        },
                        ldw,
                        bias: if bias_on {
                            b.as_mut_ptr()
                        } else {
                            ptr::null_mut()
                        },
                    });
                }
                // An aliased entry claims its own layer's shape over an
                // earlier, possibly smaller buffer: the overlap must be
                // refused before any access, which is what is fuzzed here.
                let mut s = std::mem::zeroed::<KfacStepStats>();
                s.struct_size = std::mem::size_of::<KfacStepStats>();
                let sp = if stats {
                    &mut s as *mut _
                } else {
                    ptr::null_mut()
                };
                if allreduce_only {
                    kfac_allreduce_gradients(*p, entries.as_ptr(), entries.len())
                } else {
                    kfac_step(*p, entries.as_ptr(), entries.len(), sp)
                }
            }
            Call::Stats => {
                let mut s = std::mem::zeroed::<KfacStepStats>();
                s.struct_size = std::mem::size_of::<KfacStepStats>();
                kfac_last_stats(*p, &mut s)
            }
            Call::SaveLoad {
                short_by,
                flip,
                truncate,
            } => {
                let mut size = 0usize;
                let st = kfac_save_size(*p, &mut size);
                if st != KFAC_OK {
                    return st;
                }
                let len = size.saturating_sub(short_by as usize % 3);
                let mut buf = vec![0u8; len];
                let mut written = 0usize;
                let st = kfac_save(*p, buf.as_mut_ptr(), len, &mut written);
                if st != KFAC_OK {
                    return st;
                }
                assert_eq!(written, size);
                if let (Some((at, x)), false) = (flip, buf.is_empty()) {
                    let at = at as usize % buf.len();
                    buf[at] ^= x.max(1);
                }
                if let Some(t) = truncate {
                    buf.truncate(t as usize % (buf.len() + 1));
                }
                let mut q = ptr::null_mut();
                let st = kfac_load(buf.as_ptr(), buf.len(), ptr::null_mut(), &mut q);
                if st == KFAC_OK {
                    let _ = kfac_precond_free(*p);
                    freed.push(*p);
                    *p = q;
                } else {
                    assert!(q.is_null());
                }
                st
            }
            Call::Free(x) if x < 224 => KFAC_OK,
            Call::Free(_) => {
                let st = kfac_precond_free(*p);
                freed.push(*p);
                *p = ptr::null_mut();
                layers.clear();
                st
            }
            Call::UseFreed(which) => {
                // Any handle freed in this run, even one freed before the
                // live one was created (a handle value is never given out
                // again, so none of them is `*p`).
                if freed.is_empty() {
                    return KFAC_OK;
                }
                let q = freed[which as usize % freed.len()];
                if q.is_null() {
                    return KFAC_OK;
                }
                assert_ne!(q, *p, "a freed handle value was given out again");
                let mut size = 0usize;
                let st = kfac_save_size(q, &mut size);
                assert_eq!(st, KFAC_ERR_INVALID_HANDLE);
                // A double free is refused and leaves the live handle alone.
                assert_eq!(kfac_precond_free(q), KFAC_ERR_INVALID_HANDLE);
                if !p.is_null() {
                    let mut n = 0u64;
                    assert_eq!(kfac_steps(*p, &mut n), KFAC_OK);
                }
                st
            }
        }
    }
}
