"""medcap's recipes, run by path (`medcap run`). This file exists so that
`PYTHONPATH=./ tune run recipes/NAME.py` imports these files rather than the
`recipes` package that torchtune's wheel installs."""
