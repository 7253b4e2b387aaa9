# install and uninstall: included by the top-level Makefile, which defines
# `release` (cargo build --release --locked).
#
#   make install [DESTDIR=/tmp/stage] [PREFIX=/usr/local]
#   make uninstall [DESTDIR=...] [PREFIX=...]
#
# Binaries and manual pages go under $(PREFIX); the systemd units go to
# $(UNITDIR), with ExecStart= pointing at $(PREFIX)/bin. The configuration and
# the flag file go to $(SYSCONFDIR)/flagshed and are never overwritten:
# `install` leaves existing ones alone, and `uninstall` keeps them, like
# /var/lib/flagshed.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= /lib/systemd/system
SYSCONFDIR ?= /etc
INSTALL ?= install
GZIP_MAN ?= gzip -9n

FLAGSHED_BINS := taskworker taskqueuer
FLAGSHED_UNITS := systemd/taskworker.service systemd/taskqueuer.service
FLAGSHED_MAN5 := man/flagshed.toml.5
FLAGSHED_MAN7 := man/flagshed.7
FLAGSHED_MAN8 := man/taskworker.8 man/taskqueuer.8
FLAGSHED_ETC := $(DESTDIR)$(SYSCONFDIR)/flagshed

.PHONY: install uninstall

install: release
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(FLAGSHED_ETC) \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man7 $(DESTDIR)$(MANDIR)/man8
	for bin in $(FLAGSHED_BINS); do \
		$(INSTALL) -m 0755 target/release/$$bin $(DESTDIR)$(BINDIR)/$$bin || exit 1; \
	done
	for unit in $(FLAGSHED_UNITS); do \
		sed 's|^ExecStart=/usr/bin/|ExecStart=$(BINDIR)/|' $$unit \
			> $(DESTDIR)$(UNITDIR)/$${unit##*/} || exit 1; \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$${unit##*/}; \
	done
	for page in $(FLAGSHED_MAN5) $(FLAGSHED_MAN7) $(FLAGSHED_MAN8); do \
		dir=$(DESTDIR)$(MANDIR)/man$${page##*.}; \
		$(GZIP_MAN) < $$page > $$dir/$${page##*/}.gz || exit 1; \
		chmod 0644 $$dir/$${page##*/}.gz; \
	done
	for file in flagshed.toml flags.json; do \
		if [ -e $(FLAGSHED_ETC)/$$file ]; then \
			echo "keeping existing $(FLAGSHED_ETC)/$$file"; \
		else \
			$(INSTALL) -m 0644 etc/$$file $(FLAGSHED_ETC)/$$file || exit 1; \
		fi; \
	done

uninstall:
	for bin in $(FLAGSHED_BINS); do rm -f $(DESTDIR)$(BINDIR)/$$bin; done
	for unit in $(FLAGSHED_UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$${unit##*/}; done
	for page in $(FLAGSHED_MAN5) $(FLAGSHED_MAN7) $(FLAGSHED_MAN8); do \
		dir=$(DESTDIR)$(MANDIR)/man$${page##*.}; \
		rm -f $$dir/$${page##*/} $$dir/$${page##*/}.gz; \
	done
	echo "kept $(FLAGSHED_ETC) and /var/lib/flagshed; remove them by hand if unwanted"
