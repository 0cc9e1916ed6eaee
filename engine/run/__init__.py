"""Running a plan: streaming writers, the output directory's ownership, parts, and verification."""
