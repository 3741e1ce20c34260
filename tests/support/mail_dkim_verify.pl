#!/usr/bin/perl
# Verify the DKIM signatures of the message on stdin with Perl's Mail::DKIM, an
# implementation independent of mailstrom and of dkimpy. Keys are looked up through the
# DNS server at 127.0.0.1, port ARGV[0] (the tests' loopback server). Prints one line per
# signature: "domain selector algorithm result detail".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($port) = @ARGV;
die "usage: $0 DNS-PORT < message\n" unless $port;
Mail::DKIM::DNS::resolver(
    Net::DNS::Resolver->new(
        nameservers => ['127.0.0.1'],
        port        => $port,
        recurse     => 1,
        udp_timeout => 5,
        tcp_timeout => 5,
        retry       => 1,
    )
);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $signature ($dkim->signatures) {
    printf "%s %s %s %s %s\n", $signature->domain, $signature->selector,
        $signature->algorithm, $signature->result, ($signature->result_detail // '');
}
