"""fedpriv's Hydra configuration, installed as the package ``fedpriv_conf`` (pyproject's
package-dir maps it to this folder); loaded through Hydra's ``pkg://fedpriv_conf`` search path."""
