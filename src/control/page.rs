//! The status page at the admin listener's `/`: server-rendered HTML from the API's own answers.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::Control;

pub(super) async fn page(_control: &Control) -> Response<Full<Bytes>> {
    super::respond(
        StatusCode::NOT_IMPLEMENTED,
        "text/plain; charset=utf-8",
        Bytes::from_static(b"the status page is not built yet\n"),
    )
}
