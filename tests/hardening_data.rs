//! Hardening, second round (issue 28): dataset inputs (folder datasets, headers, encodings).
