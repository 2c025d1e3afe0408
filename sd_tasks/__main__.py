import atexit
import logging
import os
import sys

from sd_tasks.cli import main

code = main()
# Exit without tearing the interpreter down: with torch, diffusers and transformers loaded that takes 1-3 s per step
# process (freeing every module's objects), and nothing is left to do once the result line is out. The exit
# handlers (MLflow's, logging's) still run, and the streams are flushed first.
atexit._run_exitfuncs()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
