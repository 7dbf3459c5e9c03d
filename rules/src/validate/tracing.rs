//! Validation of `server.tracing`.

use crate::error::JsonPath;
use crate::model::Tracing;

use super::Validator;

impl Validator<'_> {
    /// `server.tracing`: every problem reported at its field's path.
    pub(super) fn tracing(&mut self, t: &Tracing) {
        let p = JsonPath::root().key("server").key("tracing");
        // NaN fails both comparisons, so it is reported too.
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            self.err(
                p.key("sample_ratio"),
                format!("{} is out of range; allowed 0..=1", t.sample_ratio),
            );
        }
    }
}
