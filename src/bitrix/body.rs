//! Reading an HTTP answer's body under a size cap, for the REST client and the token requests
//! alike (a leaf: it imports nothing of `bitrix`).

/// Why a body could not be read.
pub(super) enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

/// Reads a response body, refusing more than `cap` bytes.
pub(super) async fn read_body(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if buf.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}
