"""One module per ``colaprob`` subcommand (see ``colaprob.cli``)."""
