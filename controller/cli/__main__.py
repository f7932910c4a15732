"""``python -m controller.cli`` is ``nodemesh``."""
from controller.cli.root import main

main()
