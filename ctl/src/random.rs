//! Random bytes from the kernel (`getrandom(2)`), for API keys and tokens.

use std::io;

/// Fills `buf` with random bytes from the kernel's CSPRNG (blocks only before the pool is
/// initialised at boot).
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// A secret with a recognizable prefix: `prefix` + 64 hex digits (32 random bytes).
pub fn token(prefix: &str) -> io::Result<String> {
    let mut b = [0u8; 32];
    fill(&mut b)?;
    Ok(format!("{prefix}{}", crate::sha256::hex(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_and_have_shape() {
        let a = token("wrn_").unwrap();
        let b = token("wrn_").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
