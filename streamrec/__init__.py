"""The ``streamrec`` program: the command line on top of every layer (see ``streamrec.cli``)."""
