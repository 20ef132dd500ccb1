"""The `saeft` subcommands, one module each (`main(argv)` with its own parser); `saeft_hf.cli` dispatches to them and
the scripts in `recipes/` call the same `main`s. Unlike the library, these modules parse argv and configure logging."""
