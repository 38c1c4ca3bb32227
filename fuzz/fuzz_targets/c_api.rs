//! Fuzzes the C ABI with random call sequences; see `../driver.rs`.
#![no_main]

#[path = "../driver.rs"]
mod driver;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    driver::run(data);
});
