"""tools/install.py: pip's configuration handed to uv (pure functions; the install itself: .ci/run)."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "install.py")
_spec = importlib.util.spec_from_file_location("install_tool", _PATH)
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

# What `pip config list` printed on this project's machines (a PIP_FIND_LINKS variable beside /etc/pip.conf).
MACHINE = """:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


def test_the_machines_pip_configuration_becomes_the_same_sources_for_uv():
  args, env = install.uv_options(install.pip_settings(MACHINE))
  assert args == ["--index-strategy", "unsafe-best-match",
                  "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                  "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt"]
  assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def test_environment_overrides_install_section_overrides_global_as_pip_reads_them():
  text = "\n".join(["global.index-url='https://a.example/simple'", "install.index-url=\"https://b.example/simple\"",
                    "global.find-links='/g'", ":env:.find-links='/e1 /e2'", "freeze.index-url='https://c.example'",
                    "global.no-index='true'", "global.trusted-host='a.example'", "not a setting", ""])
  settings = install.pip_settings(text)
  assert settings == {"index-url": "https://b.example/simple", "find-links": "/e1 /e2", "no-index": "true",
                      "trusted-host": "a.example"}
  args, env = install.uv_options(settings)
  assert args == ["--index-strategy", "unsafe-best-match", "--index-url", "https://b.example/simple",
                  "--find-links", "/e1", "--find-links", "/e2", "--allow-insecure-host", "a.example", "--no-index"]
  assert env == {}


def test_no_pip_configuration_is_uv_with_pips_index_rule_only():
  assert install.uv_options(install.pip_settings("")) == (["--index-strategy", "unsafe-best-match"], {})
