"""Pure: the envelope decides who receives; map RCPT TO addresses onto DMDS calls ("legs").

Leg i is the call with key str(i) in the queue.

| envelope recipient found in | becomes                         |
|-----------------------------|---------------------------------|
| To:                         | contact (contacto / contactos)  |
| Cc:                         | copia (Cc, visible)             |
| neither (Bcc, or no header) | copia_oculta (blind copy)       |

DMDS gives every contact of a send_many_inline call its own message, and documents copia /
copia_oculta for the single-contact call only, so Cc and Bcc ride on the first contact's call and
the other To contacts go in a second call joined to the same batch (reuse_eeid). With no To
recipient, the Cc (else Bcc) recipients become the contacts, one private copy each.

`one_contact_per_call` (a message with a Reply-To, which DMDS documents for the send_one calls only):
every contact gets a call of its own, so that each carries the reply-to; the calls after the first join
its batch as above.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.model import Address


@dataclass(frozen=True, slots=True)
class Leg:
    """One DMDS call of a message: who it reaches. Legs after the first join the first's batch."""

    index: int
    contacts: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()

    @property
    def key(self) -> str:
        return str(self.index)

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(a.email for a in (*self.contacts, *self.cc, *self.bcc))


def plan_legs(
    rcpt_tos: tuple[str, ...] | list[str],
    to: tuple[Address, ...],
    cc: tuple[Address, ...],
    one_contact_per_call: bool = False,
) -> tuple[Leg, ...]:
    names = {a.email.lower(): a.name for a in (*cc, *to)}  # To names win over Cc names
    in_to = {a.email.lower() for a in to}
    in_cc = {a.email.lower() for a in cc} - in_to
    seen: set[str] = set()
    contacts: list[Address] = []
    copies: list[Address] = []
    blind: list[Address] = []
    for rcpt in rcpt_tos:
        key = rcpt.lower()
        if key in seen:  # one copy per recipient even when RCPT TO repeats an address
            continue
        seen.add(key)
        addr = Address(email=rcpt, name=names.get(key, ""))
        if key in in_to:
            contacts.append(addr)
        elif key in in_cc:
            copies.append(addr)
        else:
            blind.append(Address(email=rcpt))
    if not contacts:
        everyone = (*copies, *blind)
        if one_contact_per_call:
            return tuple(Leg(n, (a,)) for n, a in enumerate(everyone))
        return (Leg(0, everyone),) if everyone else ()
    if not copies and not blind:
        if one_contact_per_call:
            return tuple(Leg(n, (a,)) for n, a in enumerate(contacts))
        return (Leg(0, tuple(contacts)),)
    first = Leg(0, (contacts[0],), tuple(copies), tuple(blind))
    if one_contact_per_call:
        return (first, *(Leg(n, (a,)) for n, a in enumerate(contacts[1:], 1)))
    return (first, Leg(1, tuple(contacts[1:]))) if len(contacts) > 1 else (first,)
