"""The plan as data: every output file, every tensor and its recipe, proven complete before a byte is written."""
