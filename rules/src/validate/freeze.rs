//! Validation of the `freeze` window: its name, its two times (with offsets, in order) and
//! the paths it leaves editable.

use crate::error::{JsonPath, did_you_mean};
use crate::model::{Config, FREEZE_SECTIONS, parse_time};

use super::Validator;

impl Validator<'_> {
    /// The `freeze` section, if any.
    pub(super) fn freeze(&mut self, c: &Config) {
        let Some(f) = &c.freeze else {
            return;
        };
        let p = JsonPath::root().key("freeze");
        if let Some(name) = &f.name {
            self.name(p.key("name"), name);
        }
        let start = parse_time(&f.start).map_err(|e| self.err(p.key("start"), e));
        let end = parse_time(&f.end).map_err(|e| self.err(p.key("end"), e));
        if let (Ok(start), Ok(end)) = (start, end)
            && end <= start
        {
            self.err(
                p.key("end"),
                format!(
                    "{:?} is not after start {:?}: the window would be empty",
                    f.end, f.start
                ),
            );
        }
        for (i, path) in f.editable.iter().enumerate() {
            self.editable_path(p.key("editable").index(i), path);
        }
    }

    /// One `freeze.editable` entry: `SECTION[/SEGMENT...]`, no empty segment.
    fn editable_path(&mut self, p: JsonPath, path: &str) {
        let mut segments = path.split('/');
        let section = segments.next().unwrap_or_default();
        if section == "freeze" {
            // Redundant (the freeze is always editable) but harmless.
            return;
        }
        if !FREEZE_SECTIONS.contains(&section) {
            let hint = did_you_mean(section, FREEZE_SECTIONS)
                .map(|s| format!("; did you mean {s:?}?"))
                .unwrap_or_default();
            self.err(
                p,
                format!(
                    "unknown section {section:?} in {path:?}{hint} (paths are SECTION[/RULE[/FIELD...]], SECTION one of {})",
                    FREEZE_SECTIONS.join(", ")
                ),
            );
        } else if segments.any(str::is_empty) {
            self.err(
                p,
                format!("{path:?} has an empty segment; separate segments with one `/`"),
            );
        }
    }
}
