//! # kfac-capi: the C ABI of kfac (packaged as `libkfac.so`/`libkfac.a` by `kfac-ffi`)
//!
//! A thin layer over `kfac-runtime`: argument checks, conversions, error
//! mapping. The header `include/kfac.h` is generated from this crate's
//! sources by cbindgen (`ffi/cbindgen.toml`, which follows the `mod`
//! declarations below) and checked in; a test fails when it is stale.
//!
//! Conventions (repeated in the header):
//! * Every function returns a [`KfacStatus`]; `KFAC_OK` is 0. On any other
//!   status, [`kfac_last_error`] gives a message for the calling thread, and
//!   every handle and buffer is as it was before the call.
//! * Handles are opaque values (not addresses); each `*_create`/`*_join`
//!   has a `*_free`. Freed or foreign handles are detected (a registry of
//!   live handles; a freed handle's value is never given out again) and
//!   refused with `KFAC_ERR_INVALID_HANDLE`, never dereferenced.
//! * Structs that may grow ([`KfacConfig`], [`KfacCollectives`]) start with
//!   `struct_size` (rules in `extensible`).
//! * Matrices are `float`, row-major, with a leading dimension (elements
//!   between the starts of consecutive rows) `>=` the row length.
//! * No panic crosses the boundary: each entry point catches it, reports
//!   `KFAC_ERR_PANIC`, and marks the handle it was using as poisoned.
//! * A handle may be used from any thread; it serves one call at a time: a
//!   call on a handle that another thread is using (read-only calls and
//!   `*_free` included) returns `KFAC_ERR_BUSY` at once, having done
//!   nothing. Different handles may be used concurrently.
//!
//! Modules, one concern each:
//!
//! | module | what |
//! |---|---|
//! | `status` | `KfacStatus`, runtime error kind -> status, the thread's last error, `guard` (catch_unwind) |
//! | `version` | `KFAC_ABI_VERSION`, library version |
//! | `handle` | the registry of live handles, poisoning, create/free plumbing |
//! | `extensible` | the `struct_size` rules of growable structs |
//! | `config` | `KfacConfig` <-> `kfac_runtime::Config`, presets |
//! | `comm` | `KfacComm` and its constructors (local, shared memory, MPI, callbacks) |
//! | `callbacks` | `KfacCollectives` and its adapter to `Communicator` |
//! | `views` | strided views of caller memory, gradient-buffer overlap checks |
//! | `precond` | `KfacPrecond`: create, register, observe, step, statistics |
//! | `checkpoint` | save and load |
//! | `inspect` | layers by name, kinds and sizes, factors, decompositions; the AMP loss scale |

#![allow(clippy::missing_safety_doc)] // every function has a `# Safety` section

// In the order of the header: cbindgen emits functions in the order it
// parses these modules (so they are not sorted).
mod status;

mod version;

mod handle;

mod extensible;

mod config;

mod comm;

mod callbacks;

mod views;

mod precond;

mod checkpoint;

mod inspect;

pub use callbacks::{kfac_collectives_init, KfacCollectives, KfacDtype};
pub use checkpoint::{kfac_load, kfac_save, kfac_save_size};
pub use comm::{
    kfac_comm_free, kfac_comm_from_callbacks, kfac_comm_local, kfac_comm_mpi, kfac_comm_rank,
    kfac_comm_shm_from_env, kfac_comm_shm_join, kfac_has_mpi, KfacComm,
};
pub use config::{kfac_config_default, kfac_config_kfac_pytorch, KfacConfig, KfacMethod};
pub use extensible::KFAC_MAX_STRUCT_SIZE;
pub use inspect::{
    kfac_get_decomposition, kfac_get_factors, kfac_layer_id, kfac_layer_info, kfac_layer_name,
    kfac_set_grad_scale, KfacDecompositionKind, KfacLayerKind,
};
pub use precond::{
    kfac_allreduce_gradients, kfac_last_stats, kfac_num_layers, kfac_observe_conv2d,
    kfac_observe_embedding, kfac_observe_linear, kfac_precond_create, kfac_precond_free,
    kfac_register_conv2d, kfac_register_embedding, kfac_register_linear, kfac_step, kfac_steps,
    KfacGrad, KfacLayout, KfacPrecond, KfacStepStats,
};
pub use status::{kfac_last_error, kfac_status_string, kfac_test_panic, Fail, KfacStatus};
pub use version::{kfac_abi_version, kfac_version, kfac_version_string, KFAC_ABI_VERSION};
