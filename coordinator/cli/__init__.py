"""The ``fedsight`` command line: argument parser, commands, the REST client they use, the demo and its chart."""
