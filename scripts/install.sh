#!/usr/bin/env bash
# Installs libkfac (shared and static), kfac.h, kfac.hpp, kfac-launch, a
# pkg-config file and a CMake package config under a prefix:
#
#   scripts/install.sh --prefix /usr/local            # builds in release
#   scripts/install.sh --prefix DIR --lib-dir target/debug --no-build
#   scripts/install.sh --prefix DIR --mpi   # with kfac_comm_mpi (needs MPI)
#
# Then:  cc app.c $(pkg-config --cflags --libs kfac)
#   or:  find_package(kfac REQUIRED) + target_link_libraries(app kfac::kfac)
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/install.sh --prefix DIR [--lib-dir DIR] [--no-build] [--mpi]

Installs libkfac (shared and static), kfac.h, kfac.hpp, kfac-launch, a
pkg-config file (kfac.pc) and a CMake package config under DIR.

Options:
  --prefix DIR    where to install (required): DIR/lib, DIR/include, DIR/bin
  --lib-dir DIR   take the built libraries from DIR
                  [default: $CARGO_TARGET_DIR/release, else target/release]
  --no-build      do not run cargo build first (use what --lib-dir holds)
  --mpi           build with kfac_comm_mpi (needs an MPI library, e.g.
                  Debian's libopenmpi-dev and libclang-dev)
  -h, --help      print this help and exit

Then:  cc app.c $(pkg-config --cflags --libs kfac)
  or:  find_package(kfac REQUIRED) + target_link_libraries(app kfac::kfac)
USAGE
}

# The value of option $1, or exit 2 when it is missing.
need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
    echo "install.sh: $1 needs a value (see --help)" >&2
    exit 2
  fi
}

prefix=""
lib_dir=""
build=1
features=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need_value "$@"; prefix="$2"; shift 2 ;;
    --lib-dir) need_value "$@"; lib_dir="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --mpi) features="--features kfac-ffi/mpi"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix DIR is required (see --help)" >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$lib_dir" ]; then
  lib_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi
if [ "$build" = 1 ]; then
  # shellcheck disable=SC2086 # $features is empty or two words
  cargo build --release --manifest-path "$root/Cargo.toml" -p kfac-ffi -p kfac-runtime --bin kfac-launch --lib $features
fi
for f in libkfac.so libkfac.a; do
  [ -f "$lib_dir/$f" ] || { echo "install.sh: $lib_dir/$f not found" >&2; exit 1; }
done

mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
install -d "$prefix/lib/pkgconfig" "$prefix/lib/cmake/kfac" "$prefix/include" "$prefix/bin"
install -m 755 "$lib_dir/libkfac.so" "$prefix/lib/"
install -m 644 "$lib_dir/libkfac.a" "$prefix/lib/"
install -m 644 "$root/include/kfac.h" "$root/include/kfac.hpp" "$prefix/include/"
if [ -f "$lib_dir/kfac-launch" ]; then
  install -m 755 "$lib_dir/kfac-launch" "$prefix/bin/"
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"

cat > "$prefix/lib/pkgconfig/kfac.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: kfac
Description: Distributed K-FAC second-order optimization engine (C ABI)
Version: $version
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lkfac
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC

cat > "$prefix/lib/cmake/kfac/kfacConfig.cmake" <<CM
# kfac CMake package: find_package(kfac) defines kfac::kfac (shared) and
# kfac::kfac_static.
get_filename_component(_kfac_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET kfac::kfac)
  add_library(kfac::kfac SHARED IMPORTED)
  set_target_properties(kfac::kfac PROPERTIES
    IMPORTED_LOCATION "\${_kfac_prefix}/lib/libkfac.so"
    INTERFACE_INCLUDE_DIRECTORIES "\${_kfac_prefix}/include")
  add_library(kfac::kfac_static STATIC IMPORTED)
  set_target_properties(kfac::kfac_static PROPERTIES
    IMPORTED_LOCATION "\${_kfac_prefix}/lib/libkfac.a"
    INTERFACE_INCLUDE_DIRECTORIES "\${_kfac_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m")
endif()
set(kfac_VERSION $version)
CM
cat > "$prefix/lib/cmake/kfac/kfacConfigVersion.cmake" <<CV
set(PACKAGE_VERSION $version)
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
CV
echo "installed kfac $version under $prefix"
