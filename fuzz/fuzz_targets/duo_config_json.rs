//! DuoAttention `config.json`: any text gives a usable streaming size (window >= 1) or an
//! `Error::Invalid` naming config.json; never a panic.
#![no_main]

use headwise::Error;
use headwise::policy::heads::duo_attention_config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match duo_attention_config(&String::from_utf8_lossy(data)) {
        Ok(size) => assert!(size.window >= 1),
        Err(Error::Invalid { field, .. }) => assert!(field.starts_with("config.json"), "{field:?}"),
        Err(e) => panic!("not an Invalid error: {e}"),
    }
});
