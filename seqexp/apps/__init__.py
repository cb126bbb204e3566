"""The programs: seqexp (cli, with its pre-flight check of the command line), seqexp-report
and seqexp-recommend (with seqexp.load). Nothing imports this layer."""
