"""Constants of the Xen ABI that more than one layer needs, defined once."""

PAGE_SIZE = 4096                    # XC_PAGE_SIZE: x86 guests' frame size
DOMID_FIRST_RESERVED = 0x7FF0       # xen.h: DOMID_SELF and friends from here on
