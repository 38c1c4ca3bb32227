//! Property tests that drive the C ABI — the very `extern "C"` functions
//! `libkfac` exports — with random layer sets, sizes, leading dimensions,
//! padding and call orders, against the Rust API as the reference.
//!
//! What can go wrong at the boundary, and what catches it:
//! * strides or layouts converted wrongly: every result is compared bitwise
//!   with the Rust preconditioner fed the same data in dense form;
//! * reading or writing outside the logical matrix: padding between rows is
//!   NaN (a read shows up as `KFAC_ERR_NON_FINITE` or a NaN result) and must
//!   still hold the same bits after every call;
//! * state changed by a failing call: invalid calls are interleaved at
//!   random and must fail with the documented status, after which both
//!   preconditioners must still agree bitwise;
//! * checkpoints through C: save and load in the middle of a run must not
//!   change any later result.

use std::ffi::CString;
use std::ptr;

use faer::{Mat, MatMut, MatRef};
use kfac_capi::*;
use kfac_runtime::{
    Config, Conv2dSpec, ImageLayout, LayerGrad, LayerId, LayerKind, Method, Observation,
    Preconditioner,
};
use proptest::prelude::*;

use KfacStatus::*;

const NAN_BITS: u32 = 0x7fc0_0bad;

/// Deterministic data in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[derive(Clone, Debug)]
enum Spec {
    Linear {
        inf: usize,
        outf: usize,
        bias: bool,
    },
    Conv {
        cin: usize,
        cout: usize,
        /// (height, width) of kernel, stride, padding and dilation: drawn
        /// separately, so a swapped or dropped argument in the C layer shows.
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize),
        dil: (usize, usize),
        bias: bool,
        nhwc: bool,
        hw: (usize, usize),
    },
    Embedding {
        num: usize,
        dim: usize,
    },
}

impl Spec {
    fn kind(&self) -> LayerKind {
        match *self {
            Spec::Linear { inf, outf, bias } => LayerKind::Linear {
                in_features: inf,
                out_features: outf,
                bias,
            },
            Spec::Conv {
                cin,
                cout,
                k,
                stride,
                pad,
                dil,
                bias,
                nhwc,
                ..
            } => LayerKind::Conv2d(Conv2dSpec {
                in_channels: cin,
                out_channels: cout,
                kernel: k,
                stride,
                padding: pad,
                dilation: dil,
                bias,
                layout: if nhwc {
                    ImageLayout::Nhwc
                } else {
                    ImageLayout::Nchw
                },
            }),
            Spec::Embedding { num, dim } => LayerKind::Embedding {
                num_embeddings: num,
                dim,
            },
        }
    }

    fn has_bias(&self) -> bool {
        matches!(
            self,
            Spec::Linear { bias: true, .. } | Spec::Conv { bias: true, .. }
        )
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (1usize..9, 1usize..7, any::<bool>()).prop_map(|(inf, outf, bias)| Spec::Linear {
            inf,
            outf,
            bias
        }),
        (
            (1usize..4, 1usize..4),
            (1usize..4, 1usize..4),
            (1usize..3, 1usize..3),
            (0usize..2, 0usize..2),
            (1usize..3, 1usize..3),
            any::<bool>(),
            any::<bool>(),
            (3usize..7, 3usize..7)
        )
            .prop_map(|((cin, cout), k, stride, pad, dil, bias, nhwc, (h, w))| {
                // Large enough for the dilated kernel (a valid geometry).
                let span = |k: usize, d: usize| d * (k - 1) + 1;
                Spec::Conv {
                    cin,
                    cout,
                    k,
                    stride,
                    pad,
                    dil,
                    bias,
                    nhwc,
                    hw: (h.max(span(k.0, dil.0)), w.max(span(k.1, dil.1))),
                }
            }),
        (2usize..10, 1usize..6).prop_map(|(num, dim)| Spec::Embedding { num, dim }),
    ]
}

/// An invalid call; each must fail with the given status and change nothing.
#[derive(Clone, Debug)]
enum Bad {
    /// Leading dimension smaller than a row.
    ShortLeadingDim,
    /// NULL data pointer.
    NullData,
    /// Unknown layer id.
    UnknownLayer,
    /// A NaN inside the observed data.
    NanData,
    /// Two gradients sharing one buffer.
    AliasedGradients,
    /// Use of a freed preconditioner handle.
    UseAfterFree,
    /// A checkpoint with one flipped byte.
    CorruptCheckpoint(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Observe {
        layer: usize,
        n: usize,
        pad: usize,
        seed: u64,
    },
    Step {
        pad: usize,
        seed: u64,
    },
    SaveLoad,
    Bad(Bad),
}

fn op(layers: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..layers, 1usize..6, 0usize..3, any::<u64>())
            .prop_map(|(layer, n, pad, seed)| Op::Observe { layer, n, pad, seed }),
        3 => (0usize..3, any::<u64>()).prop_map(|(pad, seed)| Op::Step { pad, seed }),
        1 => Just(Op::SaveLoad),
        2 => prop_oneof![
            Just(Bad::ShortLeadingDim),
            Just(Bad::NullData),
            Just(Bad::UnknownLayer),
            Just(Bad::NanData),
            Just(Bad::AliasedGradients),
            Just(Bad::UseAfterFree),
            (0usize..10_000).prop_map(Bad::CorruptCheckpoint),
        ]
        .prop_map(Op::Bad),
    ]
}

/// A row-major `rows x cols` matrix with leading dimension `cols + pad`;
/// the padding holds NaN bits.
struct Padded {
    buf: Vec<f32>,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Padded {
    fn new(rows: usize, cols: usize, pad: usize, rng: &mut Lcg) -> Self {
        let ld = cols + pad;
        let mut buf = vec![f32::from_bits(NAN_BITS); rows * ld];
        for r in 0..rows {
            for c in 0..cols {
                buf[r * ld + c] = rng.next();
            }
        }
        Self {
            buf,
            rows,
            cols,
            ld,
        }
    }

    /// The same row-major strided view the C layer should build, so the
    /// reference runs the kernels on identical memory layouts (results of
    /// a kernel may differ in the last bit between layouts).
    fn view(&self) -> MatRef<'_, f32> {
        // SAFETY: `buf` holds `rows * ld` floats and `cols <= ld`, so every
        // element (r, c) at `r * ld + c` is in bounds; the view borrows self.
        unsafe {
            MatRef::from_raw_parts(self.buf.as_ptr(), self.rows, self.cols, self.ld as isize, 1)
        }
    }

    /// Mutable version of [`Padded::view`].
    fn view_mut(&mut self) -> MatMut<'_, f32> {
        // SAFETY: as `view`, and the view borrows self mutably.
        unsafe {
            MatMut::from_raw_parts_mut(
                self.buf.as_mut_ptr(),
                self.rows,
                self.cols,
                self.ld as isize,
                1,
            )
        }
    }

    fn dense(&self) -> Mat<f32> {
        Mat::from_fn(self.rows, self.cols, |r, c| self.buf[r * self.ld + c])
    }

    fn padding_intact(&self) -> bool {
        (0..self.rows)
            .all(|r| (self.cols..self.ld).all(|c| self.buf[r * self.ld + c].to_bits() == NAN_BITS))
    }
}

fn bits(m: &Mat<f32>) -> Vec<u32> {
    (0..m.nrows())
        .flat_map(|r| (0..m.ncols()).map(move |c| (r, c)))
        .map(|(r, c)| m[(r, c)].to_bits())
        .collect()
}

/// Everything one observation needs, for both APIs.
enum ObsData {
    Linear(Padded, Padded),
    Conv(Vec<f32>, Vec<f32>, usize, (usize, usize)),
    Embedding(Vec<u64>, Padded),
}

fn make_obs(spec: &Spec, n: usize, pad: usize, rng: &mut Lcg) -> ObsData {
    match *spec {
        Spec::Linear { inf, outf, .. } => ObsData::Linear(
            // Different paddings, so `ldg` cannot pass for `lda`.
            Padded::new(n, inf, pad, rng),
            Padded::new(n, outf, (pad + 1) % 3, rng),
        ),
        Spec::Conv {
            cin,
            cout,
            k,
            stride,
            pad: p,
            dil: d,
            hw: (h, w),
            ..
        } => {
            let oh = (h + 2 * p.0 - d.0 * (k.0 - 1) - 1) / stride.0 + 1;
            let ow = (w + 2 * p.1 - d.1 * (k.1 - 1) - 1) / stride.1 + 1;
            let x = (0..n * cin * h * w).map(|_| rng.next()).collect();
            let g = (0..n * cout * oh * ow).map(|_| rng.next()).collect();
            ObsData::Conv(x, g, n, (h, w))
        }
        Spec::Embedding { num, dim } => {
            let t = (0..n)
                .map(|i| ((rng.next().to_bits() as usize + i) % num) as u64)
                .collect();
            ObsData::Embedding(t, Padded::new(n, dim, pad, rng))
        }
    }
}

/// Observes through C. `ld_delta` is subtracted from leading dimensions
/// (to make them too short); `null` passes NULL data.
unsafe fn c_observe(
    p: *mut KfacPrecond,
    layer: u32,
    d: &ObsData,
    ld_delta: usize,
    null: bool,
) -> KfacStatus {
    // SAFETY: the caller's contract (live handle, valid pointers) is
    // forwarded; invalid arguments are ones the API promises to refuse.
    unsafe {
        let nul = |v: *const f32| if null { ptr::null() } else { v };
        match d {
            ObsData::Linear(a, g) => kfac_observe_linear(
                p,
                layer,
                nul(a.buf.as_ptr()),
                a.rows,
                a.ld - ld_delta,
                g.buf.as_ptr(),
                g.ld,
            ),
            ObsData::Conv(x, g, n, (h, w)) => {
                kfac_observe_conv2d(p, layer, nul(x.as_ptr()), g.as_ptr(), *n, *h, *w)
            }
            ObsData::Embedding(t, g) => kfac_observe_embedding(
                p,
                layer,
                t.as_ptr(),
                t.len(),
                nul(g.buf.as_ptr()),
                g.ld - ld_delta,
            ),
        }
    }
}

fn rust_observe(r: &mut Preconditioner, layer: usize, d: &ObsData) -> bool {
    let id = LayerId(layer);
    match d {
        ObsData::Linear(a, g) => r
            .observe(
                id,
                Observation::Linear {
                    activations: a.view(),
                    output_grads: g.view(),
                },
            )
            .is_ok(),
        ObsData::Conv(x, g, n, (h, w)) => r
            .observe(
                id,
                Observation::Conv2d {
                    input: x,
                    output_grads: g,
                    batch: *n,
                    height: *h,
                    width: *w,
                },
            )
            .is_ok(),
        ObsData::Embedding(t, g) => {
            let t: Vec<usize> = t.iter().map(|&v| v as usize).collect();
            r.observe(
                id,
                Observation::Embedding {
                    tokens: &t,
                    output_grads: g.view(),
                },
            )
            .is_ok()
        }
    }
}

/// One gradient set: padded weights and biases per layer.
struct Grads {
    w: Vec<Padded>,
    b: Vec<Option<Vec<f32>>>,
}

fn make_grads(specs: &[Spec], pad: usize, rng: &mut Lcg) -> Grads {
    let mut w = Vec::new();
    let mut b = Vec::new();
    for s in specs {
        let (rows, cols) = s.kind().weight_shape();
        w.push(Padded::new(rows, cols, (pad + w.len()) % 3, rng));
        b.push(
            s.has_bias()
                .then(|| (0..rows).map(|_| rng.next()).collect()),
        );
    }
    Grads { w, b }
}

fn c_grads(g: &mut Grads) -> Vec<KfacGrad> {
    g.w.iter_mut()
        .zip(g.b.iter_mut())
        .enumerate()
        .map(|(i, (w, b))| KfacGrad {
            layer: i as u32,
            weight: w.buf.as_mut_ptr(),
            ldw: w.ld,
            bias: b.as_mut().map_or(ptr::null_mut(), |b| b.as_mut_ptr()),
        })
        .collect()
}

fn check_status(got: KfacStatus, want_ok: bool, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        (got == KFAC_OK) == want_ok,
        "{what}: C returned {got:?}, Rust {}",
        if want_ok { "Ok" } else { "Err" }
    );
    prop_assert!(got != KFAC_ERR_PANIC, "{what}: a panic was caught");
    Ok(())
}

fn expect_status(got: KfacStatus, want: KfacStatus, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got, want, "{}: {}", what, last_error());
    Ok(())
}

fn last_error() -> String {
    // SAFETY: kfac_last_error returns a NUL-terminated string owned by the
    // library, valid until the next failing call on this thread.
    unsafe { std::ffi::CStr::from_ptr(kfac_last_error()) }
        .to_string_lossy()
        .into_owned()
}

struct Run {
    specs: Vec<Spec>,
    method: Method,
    inv_every: u64,
    ops: Vec<Op>,
}

fn run() -> impl Strategy<Value = Run> {
    (prop::collection::vec(spec(), 1..4), any::<bool>(), 1u64..4)
        .prop_flat_map(|(specs, inverse, inv_every)| {
            let n = specs.len();
            (
                Just(specs),
                Just(if inverse {
                    Method::Inverse
                } else {
                    Method::Eigen
                }),
                Just(inv_every),
                prop::collection::vec(op(n), 1..16),
            )
        })
        .prop_map(|(specs, method, inv_every, ops)| Run {
            specs,
            method,
            inv_every,
            ops,
        })
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {:?} inv_every={} {:?}",
            self.specs, self.method, self.inv_every, self.ops
        )
    }
}

unsafe fn c_create(run: &Run) -> *mut KfacPrecond {
    // SAFETY: the caller's contract (live handle, valid pointers) is
    // forwarded; invalid arguments are ones the API promises to refuse.
    unsafe {
        let mut cfg = std::mem::zeroed::<KfacConfig>();
        assert_eq!(
            kfac_config_default(&mut cfg, std::mem::size_of::<KfacConfig>()),
            KFAC_OK
        );
        cfg.threads = 1;
        cfg.inv_update_steps = run.inv_every;
        cfg.method = match run.method {
            Method::Eigen => KfacMethod::KFAC_METHOD_EIGEN as u32,
            Method::Inverse => KfacMethod::KFAC_METHOD_INVERSE as u32,
        };
        let mut p = ptr::null_mut();
        assert_eq!(kfac_precond_create(&cfg, ptr::null_mut(), &mut p), KFAC_OK);
        for (i, s) in run.specs.iter().enumerate() {
            let name = CString::new(format!("l{i}")).unwrap();
            let mut id = u32::MAX;
            let st = match *s {
                Spec::Linear { inf, outf, bias } => {
                    kfac_register_linear(p, name.as_ptr(), inf, outf, bias as u32, &mut id)
                }
                Spec::Conv {
                    cin,
                    cout,
                    k,
                    stride,
                    pad,
                    dil,
                    bias,
                    nhwc,
                    ..
                } => kfac_register_conv2d(
                    p,
                    name.as_ptr(),
                    cin,
                    cout,
                    k.0,
                    k.1,
                    stride.0,
                    stride.1,
                    pad.0,
                    pad.1,
                    dil.0,
                    dil.1,
                    bias as u32,
                    if nhwc {
                        KfacLayout::KFAC_LAYOUT_NHWC as u32
                    } else {
                        KfacLayout::KFAC_LAYOUT_NCHW as u32
                    },
                    &mut id,
                ),
                Spec::Embedding { num, dim } => {
                    kfac_register_embedding(p, name.as_ptr(), num, dim, &mut id)
                }
            };
            assert_eq!(st, KFAC_OK, "{}", last_error());
            assert_eq!(id as usize, i);
        }
        p
    }
}

fn rust_create(run: &Run) -> Preconditioner {
    let cfg = Config {
        threads: 1,
        inv_update_steps: run.inv_every,
        method: run.method,
        ..Config::default()
    };
    let mut r = Preconditioner::new(cfg).unwrap();
    for (i, s) in run.specs.iter().enumerate() {
        assert_eq!(r.register(&format!("l{i}"), s.kind()).unwrap(), LayerId(i));
    }
    r
}

/// Runs `run` through both APIs; returns the number of successful steps.
fn check_run(run: &Run) -> Result<usize, TestCaseError> {
    let mut rng = Lcg(0x5eed);
    let mut stepped = 0;
    let mut reference = rust_create(run);
    // SAFETY: the test passes valid pointers and sizes except where an op
    // deliberately passes invalid ones the API promises to refuse.
    unsafe {
        let mut p = c_create(run);
        for (k, op) in run.ops.iter().enumerate() {
            let what = format!("op {k} {op:?}");
            match op {
                Op::Observe {
                    layer,
                    n,
                    pad,
                    seed,
                } => {
                    let d = make_obs(&run.specs[*layer], *n, *pad, &mut Lcg(*seed));
                    let st = c_observe(p, *layer as u32, &d, 0, false);
                    let ok = rust_observe(&mut reference, *layer, &d);
                    check_status(st, ok, &what)?;
                    let padded: Vec<&Padded> = match &d {
                        ObsData::Linear(a, g) => vec![a, g],
                        ObsData::Embedding(_, g) => vec![g],
                        ObsData::Conv(..) => vec![],
                    };
                    prop_assert!(
                        padded.iter().all(|m| m.padding_intact()),
                        "{what}: padding written"
                    );
                }
                Op::Step { pad, seed } => {
                    let mut gc = make_grads(&run.specs, *pad, &mut Lcg(*seed));
                    let mut gr = make_grads(&run.specs, *pad, &mut Lcg(*seed));
                    let before: Vec<Vec<u32>> = gc.w.iter().map(|w| bits(&w.dense())).collect();
                    // Entries in a rotated order (the same for both APIs):
                    // the C layer must map them by `layer`, not position.
                    let mut cg = c_grads(&mut gc);
                    let rot = (*seed % cg.len() as u64) as usize;
                    cg.rotate_left(rot);
                    let mut stats = std::mem::zeroed::<KfacStepStats>();
                    stats.struct_size = std::mem::size_of::<KfacStepStats>();
                    let st = kfac_step(p, cg.as_ptr(), cg.len(), &mut stats);
                    let mut lg: Vec<LayerGrad<'_>> =
                        gr.w.iter_mut()
                            .zip(gr.b.iter_mut())
                            .enumerate()
                            .map(|(i, (w, b))| LayerGrad {
                                layer: LayerId(i),
                                weight: w.view_mut(),
                                bias: b.as_deref_mut(),
                            })
                            .collect();
                    lg.rotate_left(rot);
                    let rs = reference.step(&mut lg);
                    drop(lg);
                    let dense: Vec<Mat<f32>> = gr.w.iter().map(Padded::dense).collect();
                    check_status(st, rs.is_ok(), &what)?;
                    for (i, w) in gc.w.iter().enumerate() {
                        prop_assert!(w.padding_intact(), "{what}: weight padding written");
                        let got = bits(&w.dense());
                        if st == KFAC_OK {
                            prop_assert_eq!(&got, &bits(&dense[i]), "{}: layer {} weight", what, i);
                            prop_assert_eq!(
                                gc.b[i]
                                    .as_ref()
                                    .map(|b| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
                                gr.b[i]
                                    .as_ref()
                                    .map(|b| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
                                "{}: layer {} bias",
                                what,
                                i
                            );
                        } else {
                            prop_assert_eq!(&got, &before[i], "{}: failed step wrote", what);
                        }
                    }
                    if let Ok(s) = rs {
                        stepped += 1;
                        prop_assert_eq!(stats.step, s.step);
                        prop_assert_eq!(stats.inverses_updated != 0, s.inverses_updated);
                        prop_assert_eq!(stats.kl_scale.to_bits(), s.kl_scale.to_bits());
                    }
                }
                Op::SaveLoad => {
                    let mut size = 0usize;
                    expect_status(kfac_save_size(p, &mut size), KFAC_OK, &what)?;
                    let mut buf = vec![0u8; size];
                    let mut written = 0usize;
                    // One byte short is refused and writes nothing.
                    expect_status(
                        kfac_save(p, buf.as_mut_ptr(), size - 1, &mut written),
                        KFAC_ERR_BUFFER_TOO_SMALL,
                        &what,
                    )?;
                    prop_assert!(buf.iter().all(|&b| b == 0));
                    expect_status(
                        kfac_save(p, buf.as_mut_ptr(), size, &mut written),
                        KFAC_OK,
                        &what,
                    )?;
                    prop_assert_eq!(written, size);
                    prop_assert_eq!(&buf, &reference.save(), "{}: checkpoint bytes differ", what);
                    let mut q = ptr::null_mut();
                    expect_status(
                        kfac_load(buf.as_ptr(), size, ptr::null_mut(), &mut q),
                        KFAC_OK,
                        &what,
                    )?;
                    expect_status(kfac_precond_free(p), KFAC_OK, &what)?;
                    p = q;
                }
                Op::Bad(bad) => check_bad(p, run, bad, &mut rng, &what)?,
            }
        }
        // The final states agree byte for byte.
        let mut size = 0usize;
        expect_status(kfac_save_size(p, &mut size), KFAC_OK, "final")?;
        let mut buf = vec![0u8; size];
        let mut written = 0usize;
        expect_status(
            kfac_save(p, buf.as_mut_ptr(), size, &mut written),
            KFAC_OK,
            "final",
        )?;
        prop_assert_eq!(&buf, &reference.save(), "final checkpoints differ");
        expect_status(kfac_precond_free(p), KFAC_OK, "free")?;
        expect_status(kfac_precond_free(p), KFAC_ERR_INVALID_HANDLE, "double free")?;
    }
    Ok(stepped)
}

unsafe fn check_bad(
    p: *mut KfacPrecond,
    run: &Run,
    bad: &Bad,
    rng: &mut Lcg,
    what: &str,
) -> Result<(), TestCaseError> {
    // SAFETY: the caller's contract (live handle, valid pointers) is
    // forwarded; invalid arguments are ones the API promises to refuse.
    unsafe {
        let nl = run.specs.len();
        // A layer that takes a leading dimension (linear or embedding), if any.
        let ld_layer = run
            .specs
            .iter()
            .position(|s| !matches!(s, Spec::Conv { .. }));
        match bad {
            Bad::ShortLeadingDim => {
                if let Some(l) = ld_layer {
                    let d = make_obs(&run.specs[l], 3, 0, rng);
                    expect_status(c_observe(p, l as u32, &d, 1, false), KFAC_ERR_SHAPE, what)?;
                }
            }
            Bad::NullData => {
                let d = make_obs(&run.specs[0], 2, 1, rng);
                expect_status(c_observe(p, 0, &d, 0, true), KFAC_ERR_NULL, what)?;
            }
            Bad::UnknownLayer => {
                let d = make_obs(&run.specs[0], 2, 0, rng);
                let st = c_observe(p, nl as u32, &d, 0, false);
                expect_status(st, KFAC_ERR_INVALID_ARGUMENT, what)?;
            }
            Bad::NanData => {
                let mut d = make_obs(&run.specs[0], 2, 0, rng);
                match &mut d {
                    ObsData::Linear(_, g) | ObsData::Embedding(_, g) => g.buf[0] = f32::NAN,
                    ObsData::Conv(_, g, ..) => *g.last_mut().unwrap() = f32::INFINITY,
                }
                expect_status(c_observe(p, 0, &d, 0, false), KFAC_ERR_NON_FINITE, what)?;
            }
            Bad::AliasedGradients => {
                let mut g = make_grads(&run.specs, 0, rng);
                let mut cg = c_grads(&mut g);
                let first = cg[0];
                cg.push(first);
                let before = bits(&g.w[0].dense());
                let st = kfac_step(p, cg.as_ptr(), cg.len(), ptr::null_mut());
                prop_assert!(st != KFAC_OK && st != KFAC_ERR_PANIC, "{what}: {st:?}");
                prop_assert_eq!(bits(&g.w[0].dense()), before);
            }
            Bad::UseAfterFree => {
                let q = c_create(run);
                expect_status(kfac_precond_free(q), KFAC_OK, what)?;
                let d = make_obs(&run.specs[0], 2, 0, rng);
                expect_status(c_observe(q, 0, &d, 0, false), KFAC_ERR_INVALID_HANDLE, what)?;
                let mut size = 0usize;
                expect_status(kfac_save_size(q, &mut size), KFAC_ERR_INVALID_HANDLE, what)?;
            }
            Bad::CorruptCheckpoint(at) => {
                let mut size = 0usize;
                expect_status(kfac_save_size(p, &mut size), KFAC_OK, what)?;
                let mut buf = vec![0u8; size];
                let mut written = 0usize;
                expect_status(
                    kfac_save(p, buf.as_mut_ptr(), size, &mut written),
                    KFAC_OK,
                    what,
                )?;
                buf[at % size] ^= 0x20;
                let mut q = ptr::null_mut();
                expect_status(
                    kfac_load(buf.as_ptr(), size, ptr::null_mut(), &mut q),
                    KFAC_ERR_CHECKPOINT,
                    what,
                )?;
                prop_assert!(q.is_null(), "{what}: a handle came back from a failed load");
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random layers and call sequences through the C ABI match the Rust API
    /// bitwise, invalid calls fail with their documented status and change
    /// nothing, and no byte outside a logical matrix is written.
    #[test]
    fn c_api_matches_rust_api(run in run()) {
        check_run(&run)?;
    }
}

/// A fixed run over every layer kind where steps must succeed, so the
/// random suite cannot pass by only ever comparing two failures.
#[test]
fn fixed_run_over_every_layer_kind_steps() {
    let specs = vec![
        Spec::Linear {
            inf: 5,
            outf: 3,
            bias: true,
        },
        Spec::Conv {
            cin: 2,
            cout: 3,
            k: (3, 2),
            stride: (1, 2),
            pad: (1, 0),
            dil: (1, 2),
            bias: false,
            nhwc: true,
            hw: (5, 4),
        },
        Spec::Embedding { num: 6, dim: 4 },
    ];
    let mut ops = Vec::new();
    for round in 0..4u64 {
        for layer in 0..3 {
            ops.push(Op::Observe {
                layer,
                n: 4,
                pad: 2,
                seed: round * 10 + layer as u64,
            });
        }
        ops.push(Op::Bad(Bad::NanData));
        ops.push(Op::Step {
            pad: 1,
            seed: 100 + round,
        });
        if round == 1 {
            ops.push(Op::SaveLoad);
        }
    }
    for method in [Method::Eigen, Method::Inverse] {
        let run = Run {
            specs: specs.clone(),
            method,
            inv_every: 2,
            ops: ops.clone(),
        };
        assert_eq!(check_run(&run).unwrap(), 4, "{run:?}");
    }
}
