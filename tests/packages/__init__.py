"""The package matrix's helpers: pins, stand-in programs, normalisation, the table of differences."""
