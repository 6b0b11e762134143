"""Changes to rules and destinations while the node runs (from the REST API and the web page).

A change is validated as a whole configuration (the same checks as at start), applied to the
running node at once, written back to the configuration file (atomically; the previous file is
kept as `<name>.bak`) and recorded in the audit log with who made it. Comments in the YAML file are
not preserved by the write-back.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import yaml

from dicomnode.audit import Audit
from dicomnode.config import ConfigError, DicomDestination, NodeConfig, RestDestination, Rule, parse_config
from dicomnode.routing import attribute_value, condition_holds, route
from dicomnode.security import check_written_secrets


class ConfigEditor:
    def __init__(self, cfg: NodeConfig, path: Path | None, audit: Audit, check_pipeline: Callable[[str], None]):
        self.cfg, self.path, self.audit, self.check_pipeline = cfg, path, audit, check_pipeline
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ rules

    def put_rule(self, rule: Rule, who: str, position: int | None = None) -> list[Rule]:
        """Replace the rule of that name in place, or insert it (at `position`, else at the end)."""
        rules = list(self.cfg.rules)
        names = [r.name for r in rules]
        if rule.name in names and position is None:
            rules[names.index(rule.name)] = rule
        else:
            rules = [r for r in rules if r.name != rule.name]
            rules.insert(len(rules) if position is None else max(0, min(position, len(rules))), rule)
        return self._change({"rules": rules}, who, f"rule {rule.name!r} set")

    def delete_rule(self, name: str, who: str) -> list[Rule]:
        if name not in {r.name for r in self.cfg.rules}:
            raise KeyError(f"there is no rule named {name!r}")
        return self._change({"rules": [r for r in self.cfg.rules if r.name != name]}, who, f"rule {name!r} deleted")

    def order_rules(self, names: list[str], who: str) -> list[Rule]:
        """Put the rules in this order (`rule_mode: first` takes the first that matches)."""
        by_name = {r.name: r for r in self.cfg.rules}
        if sorted(names) != sorted(by_name):
            raise ConfigError(f"the new order must name every rule once: {', '.join(by_name) or 'none'}")
        return self._change({"rules": [by_name[n] for n in names]}, who, "rules reordered")

    def dry_run(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """Which rules a series with these attributes would match, condition by condition, and
        which of them would run under the configured `rule_mode`."""
        rules = list(self.cfg.rules)
        report = []
        for r in rules:
            conditions = {k: condition_holds(cond, attribute_value(attributes, k)) for k, cond in r.match.items()}
            report.append({"name": r.name, "scope": r.scope, "matches": all(conditions.values()), "conditions": conditions})
        runs = [r.name for r in route([r for r in rules if r.scope == "series"], attributes, self.cfg.rule_mode)]
        runs += [r.name for r in route([r for r in rules if r.scope == "study"], attributes, self.cfg.rule_mode)]
        return {"rule_mode": self.cfg.rule_mode, "rules": report, "would_run": runs}

    # ------------------------------------------------------------------ destinations

    def put_destination(self, name: str, dest: DicomDestination | RestDestination, who: str) -> None:
        self._change({"destinations": {**self.cfg.destinations, name: dest}}, who, f"destination {name!r} set")

    def delete_destination(self, name: str, who: str) -> None:
        if name not in self.cfg.destinations:
            raise KeyError(f"there is no destination named {name!r}")
        self._change({"destinations": {k: v for k, v in self.cfg.destinations.items() if k != name}}, who,
                     f"destination {name!r} deleted")

    # ------------------------------------------------------------------ apply

    def _change(self, sections: dict[str, Any], who: str, what: str) -> list[Rule]:
        with self._lock:
            data = self.cfg.model_dump(mode="json")
            for key, value in sections.items():
                data[key] = ([v.model_dump(mode="json") for v in value] if isinstance(value, list)
                             else {k: v.model_dump(mode="json") for k, v in value.items()})
            new = parse_config(data, "change")  # raises ConfigError naming the key
            for rule in new.rules:
                for pipeline in rule.pipelines:
                    try:
                        self.check_pipeline(pipeline)
                    except KeyError as e:
                        raise ConfigError(f"rule {rule.name!r}: {e.args[0]}") from None
            if self.path is not None:
                check_written_secrets(new, self.path)
                self._write_back({k: data[k] for k in sections})
            self.cfg.rules, self.cfg.destinations = new.rules, new.destinations
            self.audit.write("config_changed", user=who, change=what, written_to=str(self.path) if self.path else None)
            return list(self.cfg.rules)

    def _write_back(self, sections: dict[str, Any]) -> None:
        path = Path(self.path)  # type: ignore[arg-type]
        on_disk = yaml.safe_load(path.read_text()) or {}
        on_disk.update(sections)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("# Written by dicomnode after a change through the API; the previous file is "
                       f"{path.name}.bak\n" + yaml.safe_dump(on_disk, sort_keys=False))
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        shutil.copy2(path, path.with_name(path.name + ".bak"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
