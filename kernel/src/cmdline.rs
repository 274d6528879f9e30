//! The Sluice command line: `key=value` words separated by white space.
//!
//! It comes from the UEFI load options (set with `efibootmgr -u` on a lab
//! server) or from `\EFI\sluice\cmdline.txt` on the ESP. A bad word never
//! stops the boot: it is reported by name and ignored.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use log::LevelFilter;

/// The options Sluice understands, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// `test=<scenario>`: run one built-in QEMU scenario and report
    /// `SLUICE-TEST <scenario> PASS|FAIL`.
    pub test: Option<String>,
    /// `loglevel=error|warn|info|debug|trace` (default `info`).
    pub log_level: LevelFilter,
    /// `iommu=<word>[,<word>...]`: options for the IOMMU drivers, kept as
    /// words here and interpreted by the drivers that own them.
    pub iommu: Vec<String>,
    /// `vm=<description>` words, kept whole (`vm=` included) in command-line
    /// order; the hypervisor's VM configuration parses and validates them.
    pub vms: Vec<String>,
    /// Words that were not understood, each with the reason, for the log.
    pub problems: Vec<CommandLineProblem>,
}

/// One word of the command line that was ignored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLineProblem {
    pub word: String,
    pub reason: &'static str,
}

impl fmt::Display for CommandLineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ignored command-line option `{}`: {}",
            self.word, self.reason
        )
    }
}

impl Default for CommandLine {
    fn default() -> Self {
        Self {
            test: None,
            log_level: LevelFilter::Info,
            iommu: Vec::new(),
            vms: Vec::new(),
            problems: Vec::new(),
        }
    }
}

impl CommandLine {
    pub fn parse(text: &str) -> Self {
        let mut line = Self::default();
        for word in text.split_whitespace() {
            line.parse_word(word);
        }
        line
    }

    fn parse_word(&mut self, word: &str) {
        let problem = |reason| CommandLineProblem {
            word: word.to_string(),
            reason,
        };
        let Some((key, value)) = word.split_once('=') else {
            self.problems.push(problem("expected key=value"));
            return;
        };
        if value.is_empty() {
            self.problems.push(problem("the value is empty"));
            return;
        }
        match key {
            "test" => self.test = Some(value.to_string()),
            "loglevel" => match parse_level(value) {
                Some(level) => self.log_level = level,
                None => self.problems.push(problem(
                    "unknown log level (use error, warn, info, debug or trace)",
                )),
            },
            "iommu" => self
                .iommu
                .extend(value.split(',').filter(|w| !w.is_empty()).map(String::from)),
            "vm" => self.vms.push(word.to_string()),
            _ => self.problems.push(problem("unknown option")),
        }
    }
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Decodes UEFI load options: UCS-2 text, possibly NUL-terminated. Returns
/// `None` for anything that is not printable text (firmware sometimes passes
/// binary data from the boot entry), so the caller can fall back to the
/// command-line file.
pub fn decode_load_options(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 2 || !bytes.len().is_multiple_of(2) {
        return None;
    }
    let mut text = String::new();
    for unit in bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
    {
        if unit == 0 {
            break;
        }
        let c = char::from_u32(u32::from(unit))?;
        if c.is_control() && !c.is_whitespace() {
            return None;
        }
        text.push(c);
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_options_are_parsed() {
        let line = CommandLine::parse("  test=boot loglevel=debug iommu=strict,qi=off ");
        assert_eq!(line.test.as_deref(), Some("boot"));
        assert_eq!(line.log_level, LevelFilter::Debug);
        assert_eq!(line.iommu, ["strict", "qi=off"]);
        assert!(line.problems.is_empty());
    }

    #[test]
    fn vm_words_are_kept_whole_in_order() {
        let line =
            CommandLine::parse("vm=a:mem=16M:image=g test=x vm=b:mem=32M:image=g:dev=00:03.0");
        assert_eq!(
            line.vms,
            ["vm=a:mem=16M:image=g", "vm=b:mem=32M:image=g:dev=00:03.0"]
        );
        assert!(line.problems.is_empty());
    }

    #[test]
    fn bad_words_are_reported_by_name_and_ignored() {
        let line = CommandLine::parse("bogus=1 test=fault loglevel=loud nokey test= =x");
        assert_eq!(line.test.as_deref(), Some("fault"));
        assert_eq!(
            line.log_level,
            LevelFilter::Info,
            "a bad level keeps the default"
        );
        let words: Vec<_> = line.problems.iter().map(|p| p.word.as_str()).collect();
        assert_eq!(words, ["bogus=1", "loglevel=loud", "nokey", "test=", "=x"]);
        assert!(
            line.problems[0]
                .to_string()
                .contains("`bogus=1`: unknown option")
        );
    }

    #[test]
    fn load_options_decode_ucs2_and_reject_binary() {
        let ucs2: Vec<u8> = "test=boot\0"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(decode_load_options(&ucs2).as_deref(), Some("test=boot"));
        assert_eq!(
            decode_load_options(&[1, 0, 2, 0]),
            None,
            "control characters"
        );
        assert_eq!(decode_load_options(&[0x41]), None, "odd length");
        assert_eq!(decode_load_options(&[0, 0]), None, "empty");
    }
}
