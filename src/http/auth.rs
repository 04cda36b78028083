//! Authentication and authorization of a request: its `Authorization: Bearer <secret>`
//! against the key table (`crate::keyring`), and the scope its endpoint needs
//! (`router::scope`). 401 `unauthorized` (with `WWW-Authenticate`) when no key is
//! presented or the key is unknown or revoked; 403 `forbidden` naming the scope when the
//! key lacks it.

use warp::http::{header, HeaderMap};

use crate::http::problem::Problem;
use crate::keyring::{Caller, Keyring, Scope, Scopes, Unauthenticated};

/// The realm of every challenge.
const CHALLENGE: &str = "Bearer realm=\"stockd\"";

/// The caller of a request that needs `need` (`None`: anyone, unauthenticated), or the
/// problem refusing it.
pub fn authorize(
    keys: &Keyring,
    headers: &HeaderMap,
    need: Option<Scope>,
) -> Result<Caller, Problem> {
    let open = Caller {
        id: None,
        scopes: Scopes::ALL,
    };
    let Some(need) = need else {
        return Ok(open);
    };
    if !keys.enforced() {
        return Ok(open);
    }
    let secret = bearer(headers)?;
    let caller = keys.authenticate(secret).map_err(|why| match why {
        Unauthenticated::Missing => Problem::new(
            401,
            "unauthorized",
            "this request needs an API key: send Authorization: Bearer <secret>",
        )
        .header(header::WWW_AUTHENTICATE, CHALLENGE),
        Unauthenticated::Unknown => unauthorized_token("the API key is unknown or revoked"),
    })?;
    if caller.scopes.allow(need) {
        Ok(caller)
    } else {
        let scope = need.as_str();
        Err(Problem::new(
            403,
            "forbidden",
            format!("this request needs an API key with the {scope} scope (or admin)"),
        )
        .with("scope", scope)
        .header(
            header::WWW_AUTHENTICATE,
            format!("{CHALLENGE}, error=\"insufficient_scope\", scope=\"{scope}\""),
        ))
    }
}

fn unauthorized_token(detail: &str) -> Problem {
    Problem::new(401, "unauthorized", detail).header(
        header::WWW_AUTHENTICATE,
        format!("{CHALLENGE}, error=\"invalid_token\""),
    )
}

/// The secret of `Authorization: Bearer <secret>` (the scheme in any case, RFC 9110
/// 11.1); `None` without the header. Any other scheme or an empty secret is a 401.
fn bearer(headers: &HeaderMap) -> Result<Option<&[u8]>, Problem> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    let malformed = || unauthorized_token("the Authorization header must be Bearer <secret>");
    let space = value
        .iter()
        .position(|b| *b == b' ')
        .ok_or_else(malformed)?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(malformed());
    }
    let secret = rest.trim_ascii();
    if secret.is_empty() {
        return Err(malformed());
    }
    Ok(Some(secret))
}

#[cfg(test)]
mod tests {
    use warp::http::HeaderValue;

    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn bearer_secrets_are_read_and_other_schemes_refused() {
        assert_eq!(bearer(&HeaderMap::new()).unwrap(), None);
        assert_eq!(bearer(&with("Bearer abc")).unwrap(), Some(&b"abc"[..]));
        assert_eq!(bearer(&with("bearer  abc ")).unwrap(), Some(&b"abc"[..]));
        assert_eq!(bearer(&with("BEARER abc")).unwrap(), Some(&b"abc"[..]));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc", "Bearerabc"] {
            let problem = bearer(&with(bad)).unwrap_err();
            assert_eq!(
                (problem.status, problem.code),
                (401, "unauthorized"),
                "{bad}"
            );
        }
    }
}
