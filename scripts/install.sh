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

prefix=""
lib_dir=""
build=1
features=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --lib-dir) lib_dir="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --mpi) features="--features kfac-ffi/mpi"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix DIR is required" >&2; exit 2; }

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
