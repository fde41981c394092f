"""One module per ``hetcomp`` subcommand (see ``hetcomp.cli``)."""
