"""The ``mococxr`` command's parts: its arguments (``args.py``), what each subcommand does
(``handlers.py``) and the paper with its ``--plan`` (``paper.py``); ``mococxr/cli.py`` dispatches."""
