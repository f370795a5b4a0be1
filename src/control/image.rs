//! From a reference as users write it to what the mirror calls it: `nginx:1.27` is
//! `docker.io/library/nginx` at tag `1.27`, exactly as a pull through the mirror would resolve it.

use super::{Control, ControlError};
use crate::mirror::Target;
use crate::oci::{ImageRef, Reference};

impl Control {
    /// The registry and repository `text` names, and its tag or digest.
    pub(super) fn resolve_image(&self, text: &str) -> Result<(Target, Reference), ControlError> {
        let image = ImageRef::parse(text).map_err(ControlError::BadRequest)?;
        let host = image.prefix.strip_suffix('/');
        let target = self
            .mirror
            .resolve(host, &image.repository)
            .map_err(|error| ControlError::BadRequest(format!("`{text}`: {error}")))?;
        let reference = Reference::parse(&image.reference)
            .map_err(|error| ControlError::BadRequest(format!("`{text}`: {error}")))?;
        Ok((target, reference))
    }
}
