"""The command line's command groups; `xdlabel.cli` builds the parser from them."""
