//! Random bytes from the kernel (`getrandom(2)`), the one source of every secret and random
//! id in wrenn: API keys, host and agent tokens, envd access tokens, request ids.
//!
//! Failure is an error, never a weaker value: a token made of zeros would be a credential
//! anyone can guess.

use std::io;

/// Fills `buf` with random bytes from the kernel's CSPRNG (blocks only before the pool is
/// initialised at boot).
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    fill_with(buf, 0)
}

/// `n` random bytes as hex that never wait for the kernel's pool (`GRND_INSECURE`, the
/// semantics of `/dev/urandom`): for values that are not secrets and are made at early boot,
/// such as envd's instance id in a guest whose pool may not be initialised yet.
pub fn hex_early(n: usize) -> io::Result<String> {
    let mut b = vec![0u8; n];
    fill_with(&mut b, libc::GRND_INSECURE)?;
    Ok(crate::sha256::hex(&b))
}

fn fill_with(buf: &mut [u8], flags: libc::c_uint) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
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

/// `n` random bytes, lower-case hex (`2n` digits).
pub fn hex(n: usize) -> io::Result<String> {
    let mut b = vec![0u8; n];
    fill(&mut b)?;
    Ok(crate::sha256::hex(&b))
}

/// A secret with a recognizable prefix: `prefix` + 64 hex digits (32 random bytes).
pub fn token(prefix: &str) -> io::Result<String> {
    Ok(format!("{prefix}{}", hex(32)?))
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> io::Result<crate::id::Uuid> {
    let mut b = [0u8; 16];
    fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(crate::id::Uuid::from_bytes(b))
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
        assert_eq!(hex(3).unwrap().len(), 6);
        assert_eq!(hex_early(16).unwrap().len(), 32);
        assert_ne!(hex_early(16).unwrap(), hex_early(16).unwrap());
    }

    #[test]
    fn uuid_is_version_4() {
        let u = uuid_v4().unwrap().to_string();
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }
}
