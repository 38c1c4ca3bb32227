//! Library and ABI versions.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

/// Version of the C ABI: bumped on any incompatible change of a function or
/// struct in this header. 2: `struct_size` first in `KfacConfig` (whose
/// fields were reordered) and `KfacCollectives`; `kfac_config_default`
/// takes the caller's `struct_size`; read-only calls take
/// `const KfacPrecond *`; new `KFAC_ERR_RESOURCE`, `kfac_status_string`,
/// `kfac_config_kfac_pytorch`, `kfac_collectives_init`, `kfac_steps`,
/// `kfac_num_layers`.
pub const KFAC_ABI_VERSION: u32 = 2;

/// The library version as a static string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn kfac_version_string() -> *const c_char {
    static V: OnceLock<CString> = OnceLock::new();
    V.get_or_init(|| CString::new(env!("CARGO_PKG_VERSION")).unwrap_or_default())
        .as_ptr()
}

/// The library version as `major * 10000 + minor * 100 + patch`.
#[no_mangle]
pub extern "C" fn kfac_version() -> u32 {
    let p = |s: &str| s.parse::<u32>().unwrap_or(0);
    p(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
        + p(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + p(env!("CARGO_PKG_VERSION_PATCH"))
}

/// The C ABI version (`KFAC_ABI_VERSION` of the header this library was
/// built with); compare it with the header's constant at start-up.
#[no_mangle]
pub extern "C" fn kfac_abi_version() -> u32 {
    KFAC_ABI_VERSION
}
